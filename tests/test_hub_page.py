"""What a model page on the Hub can show without a serverless widget: the card's task, library and example images,
the Inference Endpoints files, and the Space that lists the model, all as huggingface_hub's own parsers read them."""

from huggingface_hub import ModelCard, SpaceCard

from conftest import REPO
from loracaptioner.hub import save_for_hub


def test_card_metadata_names_the_task_the_library_and_widget_example_images(model, processor, tmp_path):
    folder = save_for_hub(model, processor, tmp_path / "model", repo_id="someone/captioner")
    card = ModelCard.load(folder / "README.md", ignore_metadata_errors=False)
    assert card.data.pipeline_tag == "image-to-text" and card.data.library_name == "transformers"
    assert len(card.data.widget) >= 2
    assert all(example["src"].startswith("https://huggingface.co/") and example["src"].endswith((".jpg", ".png"))
               and example["example_title"] for example in card.data.widget)
    assert "handler.py" in card.text and '[{"generated_text": "..."}]' in card.text
    assert {"handler.py", "requirements.txt"} <= {path.name for path in folder.iterdir()}


def test_the_space_lists_a_model_so_the_model_page_links_to_it():
    space = SpaceCard.load(REPO / "space" / "README.md", ignore_metadata_errors=False)
    assert space.data.sdk == "gradio" and space.data.app_file == "app.py"
    assert space.data.models and all(model.count("/") == 1 for model in space.data.models)

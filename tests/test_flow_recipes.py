"""`--flow` trains a flow-matching model in each recipe; the export samples through the modality as before."""

import sys
from pathlib import Path

import diffkit
from diffkit.checkpoint import read_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
import audio_train  # noqa: E402
import image_train  # noqa: E402

IMAGE = ["--base-channels", "8", "--channel-mult", "1,2", "--num-res-blocks", "1", "--attention-levels", "1",
         "--batch-size", "8", "--sample-every", "0", "--no-progress", "--no-calibrate"]
AUDIO = ["--max-clips", "6", "--length", "1024", "--residual-channels", "8", "--num-layers", "4",
         "--dilation-cycle", "2", "--batch-size", "4", "--sample-every", "0", "--no-progress", "--preset", "cpu",
         "--no-calibrate"]


def test_image_recipe_trains_a_flow_model(tmp_path):
    export = tmp_path / "export"
    assert image_train.main(["--flow", "--max-steps", "2", "--output-dir", str(tmp_path / "run"),
                             "--export", str(export), *IMAGE]) == 0
    config = read_config(export)
    diffusion = config["diffusion"]
    assert diffusion["schedule"]["name"] == "flow" and diffusion["prediction"] == "flow"
    assert config["model"]["kwargs"]["time_scale"] == 1000.0  # its sinusoids resolve s in [0, 1]
    images = diffkit.generate(modality="image", checkpoint=export, labels=[1, 2], steps=3, seed=0, device="cpu")
    assert images.shape == (2, 1, 16, 16) and 0 <= float(images.min()) and float(images.max()) <= 1


def test_audio_recipe_trains_a_flow_model(tmp_path):
    export = tmp_path / "export"
    assert audio_train.main(["--flow", "--max-steps", "2", "--output-dir", str(tmp_path / "run"),
                             "--export", str(export), *AUDIO]) == 0
    diffusion = read_config(export)["diffusion"]
    assert diffusion["schedule"]["name"] == "flow" and diffusion["prediction"] == "flow"
    clips = diffkit.generate(modality="audio", checkpoint=export, labels=[3], steps=6, seed=0, device="cpu")
    assert clips.audio.shape == (1, 1, 1024) and bool(clips.audio.abs().max() <= 1)


def test_flow_keeps_a_prediction_given_on_the_command_line():
    parser = audio_train.build_parser()
    for argv, expected in ((["--flow"], ("flow", "flow")), (["--flow", "--prediction", "x0"], ("flow", "x0")),
                           ([], ("flow", "x0")), (["--schedule", "cosine"], ("cosine", "x0"))):
        s = audio_train.resolve_settings(parser.parse_args(argv), parser)
        assert (s["schedule"], s["prediction"]) == expected, argv
    s = image_train.resolve_settings(image_train.build_parser().parse_args(["--flow", "--prediction", "x0"]))
    assert (s["schedule"], s["prediction"]) == ("flow", "x0")

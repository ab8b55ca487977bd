"""Few-step students (modalities/text/distillation.py and recipes/text_train.py --task distill):
the student's points are the teacher's, the trajectories are the teacher's own, training moves
the student towards the teacher's end words, and the recipe records a student that samples on
its own grid."""

import copy
import sys
from pathlib import Path

import pytest
import torch

import diffkit
from diffkit.sampling import SamplingGrid
from modalities.text.distillation import (
    DistillationObjective,
    TrajectoryDataset,
    student_diffusion,
    student_grid,
    teacher_trajectories,
)
from modalities.text.modality import (
    RowConditions,
    TextSampling,
    _lengths,
    denoiser_call,
    load_text_model,
    sample_ids,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
import text_train  # noqa: E402

TINY = ["--hidden", "16", "--depth", "1", "--heads", "2", "--batch-size", "8", "--sample-every", "0",
        "--sample-steps", "2", "--num-timesteps", "100", "--no-progress", "--no-calibrate"]
DISTILL = ["--task", "distill", "--student-steps", "2", "--teacher-steps", "4", "--trajectories", "12",
           "--batch-size", "4", "--no-progress"]

pytestmark = pytest.mark.filterwarnings("ignore:.*(truncated|vocabulary).*:UserWarning")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    assert text_train.main(["--max-steps", "3", "--output-dir", str(root / "run"), "--export", str(root / "export"),
                            *TINY]) == 0
    return root / "export"


def test_the_students_points_are_the_teachers():
    schedule = diffkit.Diffusion("sqrt", 100, prediction="x0").schedule
    teacher = SamplingGrid.from_times(schedule, torch.arange(99, -1, -10))  # 10 points
    grid, indices = student_grid(teacher, 4)
    assert indices == [0, 2, 5, 8]  # evenly spread, the first is the teacher's first
    assert grid.times.tolist() == teacher.times[indices].tolist()
    assert torch.equal(grid.alphas[:-1], teacher.alphas[indices]) and grid.alphas[-1] == 1 and grid.sigmas[-1] == 0
    assert student_grid(teacher, 10)[1] == list(range(10))
    with pytest.raises(ValueError, match="between 1 and the teacher's 10 steps"):
        student_grid(teacher, 11)


def test_the_student_diffusion_samples_on_the_students_grid():
    teacher = diffkit.Diffusion("sqrt", 100, prediction="x0")
    grid, _ = student_grid(teacher.sampling_grid(10, sampler="ddim"), 3)
    student = student_diffusion(teacher, grid)
    assert student.sampling_grid(3, sampler="ddim").times.tolist() == grid.times.tolist()
    assert teacher.sampling_grid(3, sampler="ddim").times.tolist() != grid.times.tolist()
    # It survives the checkpoint's JSON config, and the teacher's own diffusion is left alone.
    again = diffkit.Diffusion.from_config(student.config)
    assert again.sampling_grid(3, sampler="ddim").times.tolist() == grid.times.tolist()
    assert "grids" not in teacher.calibration


def test_trajectories_are_the_teachers_own_samples(teacher):
    model = load_text_model(teacher, "cpu")
    data = teacher_trajectories(model, steps=2, teacher_steps=4, count=6, seed=3)
    assert data.states.shape == (6, 2, model.net.embed_dim, model.max_length)
    # The same draws through the ordinary sampler end on the same words (rows sorted by length).
    generator = diffkit.runs.seeded_generator(3)
    lengths = _lengths(model, 6, None, generator)
    order = torch.argsort(lengths, stable=True)
    ids = sample_ids(model, lengths[order], TextSampling("ddim", 4), RowConditions(), generator=generator,
                     group_by_length=False)
    assert torch.equal(data.ids[order, : ids.shape[1]], ids)
    assert torch.equal(data.mask.sum(1), lengths)
    # The first state is the sampler's starting noise, zero beyond each row's longest batch-mate.
    assert data.states[:, 0].abs().sum() > 0 and (data.mr == 0).all() and not data.key["guided"]


def test_trajectory_files_round_trip_and_a_damaged_one_is_a_clear_error(tmp_path):
    data = TrajectoryDataset(torch.randn(3, 2, 4, 5), torch.randint(0, 9, (3, 5)), torch.ones(3, 5, dtype=torch.bool),
                             torch.zeros(3, 8, dtype=torch.long), {"teacher": "t", "count": 3})
    path = data.save(tmp_path / "trajectories.safetensors")
    again = TrajectoryDataset.load(path)
    assert again.key == data.key and torch.equal(again.states, data.states) and torch.equal(again.mr, data.mr)
    assert set(again[1]) == {"states", "ids", "mask", "mr"} and again[1]["states"].shape == (2, 4, 5)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match="not a readable trajectory file.*delete it"):
        TrajectoryDataset.load(path)
    with pytest.raises(ValueError, match="same examples"):
        TrajectoryDataset(torch.randn(3, 2, 4, 5), torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 5))


def _student_words(net, data, times, diffusion):
    """The share of the teacher's words that the student's own DDIM samples, from the
    trajectories' starting states, land on."""
    grid = diffusion.sampling_grid(len(times), sampler="ddim")
    mask = data.mask
    with torch.no_grad():
        x = diffusion.sample(denoiser_call(net), data.states[:, 0].shape, sampler="ddim", grid=grid,
                             noise=data.states[:, 0], attention_mask=mask, mr=data.mr)
    ids = net.nearest(x)
    return (ids[mask] == data.ids[mask]).float().mean().item()


def test_training_moves_the_student_to_the_teachers_words(teacher):
    model = load_text_model(teacher, "cpu")
    data = teacher_trajectories(model, steps=2, teacher_steps=4, count=8, seed=0)
    grid, _ = student_grid(model.diffusion.sampling_grid(4, sampler="ddim"), 2)
    diffusion = student_diffusion(model.diffusion, grid)
    objective = DistillationObjective(grid.model_times())
    student = copy.deepcopy(model.net).float().train()
    for name, parameter in student.named_parameters():
        parameter.requires_grad_(not name.startswith("embedding."))
    batch = {key: torch.stack([data[i][key] for i in range(8)]) for key in data[0]}
    before, terms = objective(student, batch)
    assert set(terms) == {"cross_entropy_first", "cross_entropy_last", "word_accuracy"}
    accuracy_before = _student_words(student.eval(), data, grid.times, diffusion)
    optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=3e-2)
    student.train()
    for _ in range(60):
        loss, _ = objective(student, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * before.item()
    assert torch.equal(student.embedding.weight, model.net.embedding.weight.float())  # frozen
    accuracy_after = _student_words(student.eval(), data, grid.times, diffusion)
    assert accuracy_after > max(0.8, accuracy_before + 0.2), (accuracy_before, accuracy_after)


def test_the_objective_checks_what_it_is_given(teacher):
    model = load_text_model(teacher, "cpu")
    data = teacher_trajectories(model, steps=2, teacher_steps=4, count=2, seed=0)
    batch = {key: torch.stack([data[i][key] for i in range(2)]) for key in data[0]}
    with pytest.raises(ValueError, match="hold 2 states per example, the student has 3 points"):
        DistillationObjective(torch.tensor([90.0, 50.0, 10.0]))(model.net, batch)
    with pytest.raises(TypeError, match="softmax head"):
        DistillationObjective(torch.tensor([90.0, 10.0]))(torch.nn.Linear(2, 2), batch)


def test_the_recipe_distils_resumes_and_ships_a_student(teacher, tmp_path):
    out, export = tmp_path / "run", tmp_path / "export"
    args = [*DISTILL, "--denoiser", str(teacher), "--output-dir", str(out), "--max-steps", "2"]
    assert text_train.main(args) == 0
    kept = TrajectoryDataset.load(out / "trajectories.safetensors")
    assert len(kept) == 12 and kept.key["guided"] == 6 and (kept.mr[6:] != 0).any() and (kept.mr[:6] == 0).all()
    stamp = (out / "trajectories.safetensors").stat().st_mtime_ns
    # The same command with more steps resumes, from the kept trajectories.
    assert text_train.main([*args[:-1], "3", "--export", str(export)]) == 0
    assert (out / "trajectories.safetensors").stat().st_mtime_ns == stamp
    ckpt = diffkit.load_checkpoint(export, modality="text")
    info = ckpt.config["modality_config"]
    assert ckpt.step == 3 and info["kind"] == "distillation" and info["denoiser"] == str(teacher.resolve())
    assert {k: info["defaults"][k] for k in ("sampler", "steps", "guidance_scale")} == \
        {"sampler": "ddim", "steps": 2, "guidance_scale": 1.0}
    times = ckpt.config["diffusion"]["calibration"]["grids"]["ddim/2"]["times"]
    assert times == info["objective"]["times"] == [99.0, 49.0]
    teacher_weights = diffkit.load_checkpoint(teacher).model_state
    assert torch.equal(ckpt.model_state["embedding.weight"], teacher_weights["embedding.weight"])
    trained = diffkit.load_checkpoint(out / "checkpoint").model_state  # float32: the change survives
    assert not torch.equal(trained["up.0.weight"], teacher_weights["up.0.weight"].float())
    texts = diffkit.generate(modality="text", checkpoint=export, num_samples=2, seed=0, control={"food": "Italian"})
    assert len(texts) == 2 and all(texts)
    # Another teacher for the same run directory is refused.
    with pytest.raises(SystemExit):
        text_train.main([*args[:-1], "4", "--denoiser", str(out / "checkpoint")])


def test_every_trajectory_may_be_guided(teacher, tmp_path):
    out = tmp_path / "run"
    assert text_train.main([*DISTILL, "--denoiser", str(teacher), "--output-dir", str(out), "--max-steps", "1",
                            "--trajectories", "4", "--guided-share", "1"]) == 0
    kept = TrajectoryDataset.load(out / "trajectories.safetensors")
    assert len(kept) == 4 and kept.key["guided"] == 4 and (kept.mr != 0).any(1).all()


@pytest.mark.parametrize("args, message", [
    (["--student-steps", "3"], "--student-steps is for --task distill"),
    (["--task", "distill"], "--task distill needs --denoiser"),
    (["--task", "distill", "--denoiser", "x", "--sampler", "ddpm"], "leave --sampler and --sample-steps out"),
    (["--task", "distill", "--denoiser", "x", "--student-steps", "9", "--teacher-steps", "4"], "must not exceed"),
    (["--task", "distill", "--denoiser", "x", "--guided-share", "2"], "--guided-share must lie in"),
    (["--task", "distill", "--denoiser", "x", "--hidden", "64"], "--hidden: a student is its teacher's network"),
])
def test_bad_distillation_flags_are_clear_errors(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        text_train.main([*args, "--output-dir", str(tmp_path / "run")])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err

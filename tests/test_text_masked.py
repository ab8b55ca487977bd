"""The masked text route: its network's block-causal reading and cache, the objective's targets,
the recipe's --route masked end to end, and generate / nll on a masked checkpoint."""

import sys
from pathlib import Path

import pytest
import torch

import diffkit
from modalities.text import EMBEDDING_CHECKPOINT
from modalities.text.masked_model import MaskedTextDenoiser, block_diffusion_mask
from modalities.text.modality import nll_per_token
from modalities.text.objective import MaskedTextObjective

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
import text_train  # noqa: E402

V, BLOCK = 12, 3


def _net(mr_sizes=None):
    torch.manual_seed(0)
    return MaskedTextDenoiser(V, hidden=32, depth=2, heads=2, max_length=12, block_size=BLOCK,
                              mr_sizes=mr_sizes).eval()


@pytest.mark.parametrize("mr_sizes", [None, [3, 4]])
def test_the_cache_gives_the_logits_of_the_whole_pass(mr_sizes):
    net = _net(mr_sizes)
    x0 = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(1))
    x_t = x0.clone()
    x_t[:, [1, 4, 5, 7]] = V
    mr = None if mr_sizes is None else torch.tensor([[1, 2], [2, 3]])
    with torch.no_grad():
        whole = net(x_t, None, context=x0, mr=mr)
        cache = net.block_cache(2, mr=mr)
        parts = []
        for begin in range(0, 9, BLOCK):
            parts.append(cache.logits(x_t[:, begin: begin + BLOCK]))
            cache.commit(x0[:, begin: begin + BLOCK])
    assert torch.allclose(whole, torch.cat(parts, 1), atol=1e-5)


def test_a_block_reads_no_later_context_and_no_later_noisy_block():
    net = _net()
    x0 = torch.randint(0, V, (1, 9), generator=torch.Generator().manual_seed(2))
    x_t = torch.full_like(x0, V)
    changed_context, changed_noise = x0.clone(), x_t.clone()
    changed_context[:, 6:] = (x0[:, 6:] + 1) % V  # the last block's clean words
    changed_noise[:, 6:] = 0
    with torch.no_grad():
        base = net(x_t, None, context=x0)
        assert torch.allclose(base[:, :6], net(x_t, None, context=changed_context)[:, :6])
        assert torch.allclose(base[:, :6], net(changed_noise, None, context=x0)[:, :6])
        # ... while the plain reading (no context) sees every position.
        assert not torch.allclose(net(x_t, None)[:, :6], net(changed_noise, None)[:, :6])
    mask = block_diffusion_mask(2, 4, 2, "cpu")
    assert mask[:2, :2].all() and not mask[:2, 2:].any()  # slot tokens read only slot tokens
    assert mask[2, 2:4].all() and not mask[2, 4:6].any() and not mask[2, 6:].any()  # noisy block 0: itself
    assert mask[4, 6:8].all() and not mask[4, 8:].any()  # noisy block 1 reads clean block 0 only


def test_the_objective_scores_up_to_the_block_of_the_end_token():
    diff = diffkit.MaskedDiffusion(V, block_size=4)
    objective = MaskedTextObjective(diff, end_id=0, plain_share=0.0)
    ids = torch.tensor([[5, 6, 7, 8, 9, 0, 0, 0], [5, 6, 7, 0, 0, 0, 0, 0]])
    mask = ids != 0
    x0, counted, plain = objective.targets(ids, mask)
    assert not plain and x0.shape == (2, 8)
    assert counted[0].tolist() == [True] * 8  # 5 words, the end token, then the end of its block
    assert counted[1].tolist() == [True] * 4 + [False] * 4  # 3 words and the end token fill one block
    x0, counted, plain = MaskedTextObjective(diff, end_id=0, plain_share=1.0).targets(ids, mask)
    assert plain and counted.tolist() == mask[:, :5].tolist()  # only the words count; the length is given
    with pytest.raises(ValueError, match="block_size"):
        MaskedTextObjective(diffkit.MaskedDiffusion(V), end_id=0)


TINY = ["--route", "masked", "--hidden", "16", "--depth", "1", "--heads", "2", "--batch-size", "8",
        "--sample-every", "2", "--save-every", "2", "--sample-steps", "2", "--no-progress"]


@pytest.fixture(scope="module")
def masked_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("masked")
    with pytest.warns(UserWarning):
        assert text_train.main(["--max-steps", "3", "--output-dir", str(root / "run"), "--export",
                                str(root / "export"), *TINY]) == 0
    return root


def test_the_recipe_trains_a_masked_model_that_samples(masked_export):
    samples = (masked_export / "run" / "samples" / "step_000002.txt").read_text(encoding="utf-8").splitlines()
    assert len(samples) == 16 and all(" => " in line for line in samples[8:])
    ckpt = diffkit.load_checkpoint(masked_export / "export", modality="text")
    assert ckpt.config["diffusion"]["class"] == "MaskedDiffusion" and ckpt.config["diffusion"]["block_size"] == 4
    assert ckpt.config["modality_config"]["defaults"]["sampler"] == "confidence"
    export = masked_export / "export"
    texts = diffkit.generate(modality="text", checkpoint=export, num_samples=3, seed=0)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    assert texts == diffkit.generate(modality="text", checkpoint=export, num_samples=3, seed=0)
    fixed = diffkit.generate(modality="text", checkpoint=export, num_samples=2, seed=0, length=5)
    assert all(len(t.split()) == 5 for t in fixed)
    filled = diffkit.generate(modality="text", checkpoint=export, num_samples=2, seed=0,
                              infill="The Eagle is a [MASK] [MASK] in the city centre .")
    assert all(t.startswith("The Eagle is a ") and t.endswith(" in the city centre .") and "[MASK]" not in t
               for t in filled)
    assert len(diffkit.generate(modality="text", checkpoint=export, num_samples=2, seed=0,
                                control={"food": "Italian"}, top_p=0.9, sampler="confidence", steps=3,
                                threshold=0.5)) == 2
    bits = nll_per_token(["The Eagle is a pub .", "The Mill is near the river ."], checkpoint=export,
                         mrs=[{"name": "The Eagle"}, {"name": "The Mill"}], steps=2)
    assert bits.shape == (2,) and torch.isfinite(bits).all() and (bits > 0).all()


def test_the_same_seed_trains_the_same_masked_network(masked_export, tmp_path):
    with pytest.warns(UserWarning):
        assert text_train.main(["--max-steps", "3", "--output-dir", str(tmp_path / "again"), *TINY]) == 0
    first = diffkit.load_checkpoint(masked_export / "run" / "checkpoint").model_state
    second = diffkit.load_checkpoint(tmp_path / "again" / "checkpoint").model_state
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_options_of_the_other_route_are_refused(masked_export):
    export = masked_export / "export"
    for option in ({"clamp": True}, {"best_of": 2}, {"guidance_mix": "x0", "control": {"food": "Italian"}}):
        with pytest.raises(ValueError, match="option of the embedding text route.*masked-route model"):
            diffkit.generate(modality="text", checkpoint=export, num_samples=1, **option)
    for option in ({"top_p": 0.5}, {"threshold": 0.9}):
        with pytest.raises(ValueError, match="option of the masked text route"):
            diffkit.generate(modality="text", checkpoint=EMBEDDING_CHECKPOINT, num_samples=1, **option)
    with pytest.raises(ValueError, match="threshold is a probability in \\(0, 1\\] for the confidence sampler"):
        diffkit.generate(modality="text", checkpoint=export, num_samples=1, sampler="ancestral", threshold=0.9)
    with pytest.raises(ValueError, match="unknown sampler 'ddim' for a masked text model"):
        diffkit.generate(modality="text", checkpoint=export, num_samples=1, sampler="ddim")
    with pytest.raises(ValueError, match="steps"):
        diffkit.generate(modality="text", checkpoint=export, num_samples=1, steps=0)
    with pytest.raises(ValueError, match=r"no \[MASK\]"):
        diffkit.generate(modality="text", checkpoint=export, num_samples=1, infill="The Eagle is a pub .")
    with pytest.raises(ValueError, match="top_p must lie in"):
        diffkit.generate(modality="text", checkpoint=export, num_samples=1, top_p=1.5)
    with pytest.raises(ValueError, match="bound='discrete'"):
        nll_per_token(["a pub ."], checkpoint=export, bound="embedding")


@pytest.mark.parametrize("args, message", [
    (["--route", "masked", "--embed-dim", "8"], "--embed-dim is an embedding-route flag"),
    (["--route", "masked", "--task", "classifier"], "--route masked trains a denoiser"),
    (["--block-size", "4"], "--block-size is for --route masked"),
    (["--route", "masked", "--plain-share", "1"], r"--plain-share must lie in \[0, 1\)"),
    (["--route", "masked", "--sampler", "ddim"], "unknown sampler 'ddim' for a masked text model"),
])
def test_recipe_flags_of_the_other_route_are_usage_errors(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        text_train.main([*args, "--output-dir", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()[-1]) < 300
    assert __import__("re").search(message, err)


def test_a_masked_teacher_is_refused_by_distillation(masked_export, tmp_path, capsys):
    with pytest.raises(SystemExit):
        text_train.main(["--task", "distill", "--denoiser", str(masked_export / "export"), "--output-dir",
                         str(tmp_path / "d"), "--no-progress"])
    assert "masked" in capsys.readouterr().err


def test_the_cache_reads_a_subset_of_rows_as_the_whole_batch_does():
    net = _net([3, 4])
    x0 = torch.randint(0, V, (3, 6), generator=torch.Generator().manual_seed(3))
    mr = torch.tensor([[1, 2], [2, 3], [0, 1]])
    with torch.no_grad():
        cache = net.block_cache(3, mr=mr)
        cache.logits(torch.full((3, BLOCK), V))
        cache.commit(x0[:, :BLOCK])
        block = x0[:, BLOCK:].clone()
        block[:, 0] = V
        rows = torch.tensor([2, 0])
        some = cache.logits(block[rows], None, rows)
        every = cache.logits(block)
    assert torch.allclose(some, every[rows], atol=1e-5)


def test_diffkit_calibrate_refuses_a_masked_checkpoint(masked_export):
    from diffkit.calibration import calibrate_checkpoint

    with pytest.raises(ValueError, match="masked-diffusion model; its samplers .* no time grid"):
        calibrate_checkpoint(masked_export / "export", write=False)

"""diffkit.MaskedDiffusion against a small Markov chain whose conditionals are known by enumeration."""

import itertools
import math

import pytest
import torch

from diffkit.masked import MaskedDiffusion, TokenSampling

V, L = 3, 4
START = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
MOVE = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.3, 0.3, 0.4]], dtype=torch.float64)
SEQUENCES = torch.tensor(list(itertools.product(range(V), repeat=L)))
PROBS = START[SEQUENCES[:, 0]] * torch.stack([MOVE[SEQUENCES[:, i], SEQUENCES[:, i + 1]] for i in range(L - 1)]).prod(0)


def exact_model(x_t, t, **_):
    """p(x0^l | the unmasked tokens of x_t) for every position, by enumerating the chain's sequences."""
    seen = x_t != V  # (B, L)
    consistent = ((SEQUENCES[None] == x_t[:, None]) | ~seen[:, None]).all(dim=-1)  # (B, V^L)
    weights = PROBS[None] * consistent
    marginals = torch.einsum("bs,slv->blv", weights, torch.nn.functional.one_hot(SEQUENCES, V).double())
    return torch.log(marginals / marginals.sum(-1, keepdim=True)).float()


def exact_bits(x):
    index = (x * torch.tensor([V ** (L - 1 - i) for i in range(L)])).sum(1)
    return -torch.log2(PROBS[index]) / L


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_the_exact_models_bound_is_the_exact_nll(schedule):
    diff = MaskedDiffusion(V, schedule)
    x = SEQUENCES[torch.multinomial(PROBS, 24, replacement=True, generator=torch.Generator().manual_seed(0))]
    bits, terms = diff.nll(exact_model, x, samples=400, generator=torch.Generator().manual_seed(1), return_terms=True)
    exact = exact_bits(x)
    assert abs(float((bits.double() - exact).mean())) < 4 * terms["mc_stderr"] + 0.01
    assert terms["mc_stderr"] < 0.02 and terms["stderr"] > 0


def test_a_worse_model_has_a_larger_bound():
    diff = MaskedDiffusion(V)
    x = SEQUENCES[torch.multinomial(PROBS, 32, replacement=True, generator=torch.Generator().manual_seed(2))]
    uniform = diff.nll(lambda x_t, t: torch.zeros(*x_t.shape, V), x, samples=64,
                       generator=torch.Generator().manual_seed(3))
    exact = diff.nll(exact_model, x, samples=64, generator=torch.Generator().manual_seed(3))
    assert float(uniform.mean()) == pytest.approx(math.log2(V), rel=0.05)  # every masked token costs log2 V
    assert float(exact.mean()) < float(uniform.mean()) - 0.1


def _distribution(samples):
    index = (samples * torch.tensor([V ** (L - 1 - i) for i in range(L)])).sum(1)
    return torch.bincount(index, minlength=V**L).double() / len(samples)


def test_many_step_ancestral_sampling_reproduces_the_chain():
    diff = MaskedDiffusion(V)
    x = diff.sample(exact_model, (3000, L), steps=64, generator=torch.Generator().manual_seed(4))
    assert 0.5 * float((_distribution(x) - PROBS).abs().sum()) < 0.06  # total variation (sampling noise ~0.03)


def test_calls_at_batch_one_never_exceed_the_length():
    diff = MaskedDiffusion(V)
    for steps in (2, 16, 1000):
        calls = []

        def counting(x_t, t, _calls=calls):
            _calls.append(1)
            return exact_model(x_t, t)

        x = diff.sample(counting, (1, L), steps=steps, generator=torch.Generator().manual_seed(steps))
        assert (x != diff.mask_id).all() and len(calls) <= min(L, steps)


def test_known_tokens_stay_and_condition_the_rest():
    diff = MaskedDiffusion(V)
    known = torch.zeros(2000, L, dtype=torch.long)
    known[:, 0] = 2
    known_mask = torch.zeros(2000, L, dtype=torch.bool)
    known_mask[:, 0] = True
    x = diff.sample(exact_model, (2000, L), steps=32, known=known, known_mask=known_mask,
                    generator=torch.Generator().manual_seed(5))
    assert (x[:, 0] == 2).all()
    follow = torch.bincount(x[:, 1], minlength=V).double() / 2000
    assert float((follow - MOVE[2]).abs().max()) < 0.04  # p(x1 | x0 = 2) of the chain


def test_positions_left_out_keep_their_value():
    diff = MaskedDiffusion(V)
    fill = torch.tensor([[True, True, False, False]])
    known = torch.tensor([[0, 0, 1, 1]])
    x = diff.sample(exact_model, (5, L), steps=8, known=known, fill=fill, generator=torch.Generator().manual_seed(6))
    assert (x[:, 2:] == 1).all() and (x[:, :2] != diff.mask_id).all()


def test_confidence_sampler_reveals_the_surest_tokens_first():
    diff = MaskedDiffusion(V)
    order = []

    def recording(step):
        order.append(step["x"][0].clone())

    x = diff.sample(exact_model, (1, L), steps=L, sampler="confidence", callback=recording,
                    sampling=TokenSampling(temperature=1e-4), generator=torch.Generator().manual_seed(7))
    assert (x != diff.mask_id).all()
    revealed = [int((state != diff.mask_id).sum()) for state in order]
    assert revealed == sorted(revealed) and revealed[-1] == L
    # A near-zero temperature and no noise: the chain's most likely sequence.
    assert x[0].tolist() == SEQUENCES[PROBS.argmax()].tolist()


def test_guidance_mixes_log_probabilities():
    diff = MaskedDiffusion(V)

    def conditional(x_t, t, drop_cond=None):
        logits = exact_model(x_t, t)
        if drop_cond is None:
            return logits
        # The conditional model prefers token 2 everywhere; the unconditional one is the chain.
        return torch.where(drop_cond[:, None, None], logits, logits + torch.tensor([0.0, 0.0, 1.0]))

    plain = diff.sample(conditional, (1500, L), steps=16, generator=torch.Generator().manual_seed(8))
    guided = diff.sample(conditional, (1500, L), steps=16, guidance_scale=3.0, generator=torch.Generator().manual_seed(8))
    assert float((guided == 2).double().mean()) > float((plain == 2).double().mean()) + 0.2


def test_guidance_keeps_ruled_out_tokens_out():
    diff = MaskedDiffusion(V)

    def banning(x_t, t, drop_cond, context=None):  # token 1 is impossible under both models
        logits = exact_model(x_t, t) if context is None else exact_block_model(x_t, t, context)
        logits[..., 1] = -math.inf
        return torch.where(drop_cond[:, None, None], logits, logits * 0.5)

    for block_size in (None, 2):
        x = diff.sample(banning, (500, L), steps=8, guidance_scale=3.0, block_size=block_size,
                        generator=torch.Generator().manual_seed(25))
        assert (x != 1).all() and (x != diff.mask_id).all()


def test_token_sampling_keeps_the_nucleus():
    logp = TokenSampling(top_p=0.6).log_probs(torch.log(torch.tensor([[0.5, 0.3, 0.2]])))
    assert torch.isinf(logp[0, 2]) and torch.allclose(logp[0, :2].exp(), torch.tensor([0.625, 0.375]))
    with pytest.raises(ValueError, match="top_p"):
        TokenSampling(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        TokenSampling(temperature=True)


def test_bad_input_is_refused():
    diff = MaskedDiffusion(V)
    assert diff.mask_id == V and MaskedDiffusion.from_config(diff.config).num_classes == V
    with pytest.raises(ValueError, match="steps must be"):
        diff.sample(exact_model, (1, L), steps=0)
    with pytest.raises(ValueError, match="unknown sampler"):
        diff.sample(exact_model, (1, L), sampler="greedy")
    with pytest.raises(ValueError, match="outside"):
        diff.loss(exact_model, torch.tensor([[0, 1, 3, 0]]))
    with pytest.raises(ValueError, match=r"\(B, L\) integer"):
        diff.loss(exact_model, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="logits"):
        diff.loss(lambda x_t, t: torch.zeros(*x_t.shape, V + 1), torch.zeros(2, L, dtype=torch.long))
    with pytest.raises(ValueError, match="not a MaskedDiffusion config"):
        MaskedDiffusion.from_config({"class": "Diffusion"})
    with pytest.raises(ValueError, match="num_classes"):
        MaskedDiffusion(1)


def test_loss_trains_a_small_network_towards_the_chain():
    torch.manual_seed(0)
    diff = MaskedDiffusion(V)
    net = torch.nn.Sequential(torch.nn.Embedding(V + 1, 32), torch.nn.Flatten(), torch.nn.Linear(32 * L, 64),
                              torch.nn.GELU(), torch.nn.Linear(64, L * V))
    model = lambda x_t, t: net(x_t).reshape(-1, L, V)  # noqa: E731
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    data = SEQUENCES[torch.multinomial(PROBS, 4096, replacement=True, generator=torch.Generator().manual_seed(9))]
    held = SEQUENCES[torch.multinomial(PROBS, 256, replacement=True, generator=torch.Generator().manual_seed(10))]
    before = float(diff.nll(model, held, samples=8, generator=torch.Generator().manual_seed(11)).mean())
    gen = torch.Generator().manual_seed(12)
    for _ in range(300):
        batch = data[torch.randint(0, len(data), (128,), generator=gen)]
        loss = diff.loss(model, batch, generator=gen)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
        opt.step()
    after = float(diff.nll(model, held, samples=8, generator=torch.Generator().manual_seed(11)).mean())
    exact = float(exact_bits(held).mean())
    assert after < before - 0.2 and after < exact + 0.1


def test_a_checkpoint_keeps_its_route(tmp_path):
    from diffkit import Diffusion
    from diffkit.checkpoint import load_network, save_checkpoint

    net = torch.nn.Linear(2, 2)
    path = save_checkpoint(tmp_path / "masked", model=net, step=1,
                           config={"modality": "toy", "model": {"class": "Linear", "kwargs": {"in_features": 2,
                                                                                             "out_features": 2}},
                                   "diffusion": MaskedDiffusion(V, "cosine").config})
    loaded = load_network(path, {"Linear": torch.nn.Linear})
    assert isinstance(loaded.diffusion, MaskedDiffusion) and loaded.diffusion.schedule == "cosine"
    with pytest.raises(ValueError, match="MaskedDiffusion.from_config"):
        Diffusion.from_config(loaded.diffusion.config)


# ------------------------------------------------------------------ block diffusion
B = 2  # block size: the chain's 4 tokens are two blocks


def exact_block_model(x_t, t, context, **_):
    """Block-causal exact conditionals: block j sees its own unmasked tokens and the clean
    context blocks before it, nothing after. A prefix shorter than the chain is read as such."""
    length = x_t.shape[1]
    x_t, context = (torch.nn.functional.pad(z, (0, L - length), value=V) for z in (x_t, context))
    position = torch.arange(L)
    out = []
    for begin in range(0, L, B):
        view = torch.where(position < begin, context, torch.where(position < begin + B, x_t, V))
        out.append(exact_model(view, t)[:, begin: begin + B])
    return torch.cat(out, dim=1)[:, :length]


def test_the_exact_block_models_bound_is_the_exact_nll():
    diff = MaskedDiffusion(V, block_size=B)
    x = SEQUENCES[torch.multinomial(PROBS, 24, replacement=True, generator=torch.Generator().manual_seed(20))]
    bits, terms = diff.nll(exact_block_model, x, samples=400, generator=torch.Generator().manual_seed(21),
                           return_terms=True)
    assert abs(float((bits.double() - exact_bits(x)).mean())) < 4 * terms["mc_stderr"] + 0.01


class _CountingCache:
    """A BlockCache over the exact model, counting the tokens it is asked about."""

    def __init__(self, batch):
        self.prefix, self.tokens_read = torch.zeros(batch, 0, dtype=torch.long), 0

    def logits(self, x_block, t, rows=None):
        self.tokens_read += x_block.numel()
        x = torch.cat([self.prefix if rows is None else self.prefix[rows], x_block], dim=1)
        return exact_block_model(x, t, context=x)[:, self.prefix.shape[1]:]

    def commit(self, x_block):
        self.prefix = torch.cat([self.prefix, x_block], dim=1)


class _CachedExact:
    def __init__(self):
        self.caches = []

    def __call__(self, x_t, t, context):
        raise AssertionError("a model with block_cache is read through its cache")

    def block_cache(self, batch):
        self.caches.append(_CountingCache(batch))
        return self.caches[-1]


def test_block_sampling_reproduces_the_chain_with_and_without_a_cache():
    diff = MaskedDiffusion(V, block_size=B)
    plain = diff.sample(exact_block_model, (8000, L), steps=32, generator=torch.Generator().manual_seed(22))
    assert 0.5 * float((_distribution(plain) - PROBS).abs().sum()) < 0.05  # total variation (sampling noise ~0.03)
    model = _CachedExact()
    cached = diff.sample(model, (8000, L), steps=32, generator=torch.Generator().manual_seed(22))
    assert torch.equal(cached, plain)  # the cache changes the work, not the result
    assert model.caches[0].prefix.shape[1] == L - B  # the last block is never committed


def test_block_sampling_stops_at_the_stop_token():
    diff = MaskedDiffusion(V, block_size=B)

    def stops_early(x_t, t, context):  # token 0 is certain in the first block
        logits = exact_block_model(x_t, t, context)
        logits[:, :B] = torch.tensor([0.0, -50.0, -50.0])
        return logits

    x = diff.sample(stops_early, (4, L), steps=2, stop_id=0, generator=torch.Generator().manual_seed(23))
    assert (x[:, :B] == 0).all() and (x[:, B:] == diff.mask_id).all()
    with pytest.raises(ValueError, match="stop_id"):
        diff.sample(stops_early, (4, L), steps=2, stop_id=V)
    with pytest.raises(ValueError, match="block_size"):
        MaskedDiffusion(V, block_size=0)
    assert MaskedDiffusion.from_config(diff.config).block_size == B


def test_block_guidance_reads_the_dropped_condition_through_the_cache():
    diff = MaskedDiffusion(V, block_size=B)

    def conditional(x_t, t, context, drop_cond):
        logits = exact_block_model(x_t, t, context)
        return torch.where(drop_cond[:, None, None], logits, logits + torch.tensor([0.0, 0.0, 1.0]))

    plain = diff.sample(conditional, (1500, L), steps=4, generator=torch.Generator().manual_seed(24),
                        drop_cond=torch.zeros(1500, dtype=torch.bool))
    guided = diff.sample(conditional, (1500, L), steps=4, guidance_scale=3.0, generator=torch.Generator().manual_seed(24))
    assert float((guided == 2).double().mean()) > float((plain == 2).double().mean()) + 0.2


def test_a_confidence_threshold_reveals_the_sure_tokens_at_once():
    diff = MaskedDiffusion(V)
    calls = []

    def sure(x_t, t):  # every token is certain: token 2 everywhere
        calls.append(x_t.shape[0])
        return torch.tensor([-30.0, -30.0, 0.0]).expand(*x_t.shape, V)

    x = diff.sample(sure, (3, L), steps=L, sampler="confidence", confidence_threshold=0.9,
                    generator=torch.Generator().manual_seed(26))
    assert (x == 2).all() and calls == [3]  # one call reveals everything
    calls.clear()
    diff.sample(sure, (3, L), steps=L, sampler="confidence", generator=torch.Generator().manual_seed(26))
    assert len(calls) == L  # one token a step without the threshold
    with pytest.raises(ValueError, match="confidence_threshold"):
        diff.sample(sure, (3, L), sampler="ancestral", confidence_threshold=0.9)


def test_rows_that_are_done_are_not_read_again():
    diff = MaskedDiffusion(V)
    read = []

    def first_row_sure(x_t, t):
        read.append(x_t.shape[0])
        logits = exact_model(x_t, t)
        if x_t.shape[0] == 2:  # the full batch: row 0 is certain of token 0
            logits[0] = torch.tensor([0.0, -30.0, -30.0])
        return logits

    diff.sample(first_row_sure, (2, L), steps=L, sampler="confidence", confidence_threshold=0.9,
                generator=torch.Generator().manual_seed(27))
    assert read[0] == 2 and all(rows == 1 for rows in read[1:]) and len(read) == L  # row 0 was done after one call

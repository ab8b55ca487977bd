"""The text denoiser and its objective: padding never counts, the rounding head is tied, the
clamping trick snaps to embeddings exactly, and the objective trains the embeddings."""

import pytest
import torch

import diffkit
from modalities.text.modality import snap_to_embeddings
from modalities.text.model import TextDenoiser
from modalities.text.objective import TextObjective, scales_at_step


def tiny_net(mr_sizes=None, seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(vocab_size=12, embed_dim=4, hidden=16, depth=2, heads=2, max_length=8, dropout=0.0)
    args.update(kw)
    return TextDenoiser(mr_sizes=mr_sizes, **args).eval()


def diffusion():
    return diffkit.Diffusion("sqrt", 50, "x0")


def batch_with_padding():
    ids = torch.tensor([[3, 4, 5, 6, 7, 8], [5, 6, 7, 0, 0, 0]])
    return {"ids": ids, "mask": ids != 0, "mr": torch.tensor([[2, 3], [1, 0]])}


def test_padding_never_counts_in_the_loss():
    net = tiny_net(mr_sizes=[4, 5])
    objective = TextObjective(diffusion(), cond_drop_prob=0.0, slot_drop_prob=0.0)
    batch = batch_with_padding()
    t = torch.tensor([10, 30])
    noise = torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(1))

    def loss(b, n):
        return objective.loss(net, b, t=t, noise=n, generator=torch.Generator().manual_seed(2))[0]

    base = loss(batch, noise)
    # Other tokens (hence other targets and other noisy inputs) at the padded positions, and
    # other noise there: the loss must not move.
    changed = {**batch, "ids": batch["ids"].clone()}
    changed["ids"][1, 3:] = torch.tensor([9, 10, 11])
    other_noise = noise.clone()
    other_noise[1, :, 3:] = 5.0
    assert torch.allclose(loss(changed, other_noise), base, atol=1e-6, rtol=0)
    # A change at a real position does move it (the comparison above can fail).
    real = {**batch, "ids": batch["ids"].clone()}
    real["ids"][1, 1] = 9
    assert not torch.allclose(loss(real, noise), base)


def test_padded_positions_neither_influence_nor_get_output():
    net = tiny_net()
    x = torch.randn(2, 4, 6)
    mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    t = torch.tensor([5.0, 20.0])
    out = net(x, t, attention_mask=mask)
    x2 = x.clone()
    x2[1, :, 3:] = torch.randn(4, 3) * 10
    out2 = net(x2, t, attention_mask=mask)
    assert torch.allclose(out, out2, atol=1e-6)
    assert out[1, :, 3:].abs().max() == 0
    # Without the mask the same change is seen by the real positions.
    assert not torch.allclose(net(x, t)[1, :, :3], net(x2, t)[1, :, :3])


def test_rounding_head_is_tied_to_the_embedding():
    net = tiny_net()
    x = torch.randn(3, 4, 5)
    logits = net.logits(x)
    assert logits.shape == (3, 5, 12)
    # The most likely word is the nearest embedding (so rounding and clamping agree).
    distances = torch.cdist(x.transpose(1, 2), net.embedding.weight[None].expand(3, -1, -1))
    assert torch.equal(logits.argmax(-1), distances.argmin(-1))
    # There is no separate output matrix: changing the embedding changes the logits.
    with torch.no_grad():
        net.embedding.weight[7] += 1.0
    changed = net.logits(x)
    assert not torch.allclose(changed[..., 7], logits[..., 7])
    assert torch.allclose(changed[..., :7], logits[..., :7])
    assert [n for n, p in net.named_parameters() if p.shape[0] == 12] == ["embedding.weight"]


def test_clamping_snaps_to_the_nearest_embedding_exactly():
    net = tiny_net()
    weight = net.embedding.weight.detach()
    ids = torch.tensor([[1, 5, 7, 2]])
    x0 = net.embed(ids).detach() + 0.01 * torch.randn(1, 4, 4)   # near words 1, 5, 7, 2
    snapped = snap_to_embeddings(net)(x0, torch.zeros(1))
    assert torch.equal(snapped, weight[ids].transpose(1, 2))
    # Far from every word: still the nearest one, bit for bit.
    far = torch.randn(2, 4, 6) * 3
    nearest = torch.cdist(far.transpose(1, 2), weight[None].expand(2, -1, -1)).argmin(-1)
    assert torch.equal(snap_to_embeddings(net)(far, torch.zeros(2)), weight[nearest].transpose(1, 2))
    # Words outside ``allowed`` (padding) are never chosen; padded positions are left alone.
    allowed = torch.ones(12, dtype=torch.bool)
    allowed[ids[0, 1]] = False
    mask = torch.tensor([[True, True, True, False]])
    out = snap_to_embeddings(net, allowed, mask)(x0, torch.zeros(1))
    assert not torch.equal(out[0, :, 1], weight[5])
    assert torch.equal(out[0, :, 3], x0[0, :, 3])


def test_mr_conditioning_and_null_condition():
    net = tiny_net(mr_sizes=[4, 5])
    x, t = torch.randn(2, 4, 6), torch.tensor([3.0, 3.0])
    mr = torch.tensor([[2, 3], [3, 1]])
    dropped = net(x, t, mr=mr, drop_cond=torch.tensor([True, False]))
    # drop_cond means "every slot unspecified" (code 0): the learned null condition.
    assert torch.allclose(dropped[0], net(x, t, mr=torch.zeros_like(mr))[0])
    assert torch.allclose(dropped[1], net(x, t, mr=mr)[1])
    assert not torch.allclose(net(x, t, mr=mr)[0], dropped[0])


def test_model_bad_input_errors():
    net = tiny_net()
    with pytest.raises(ValueError, match=r"expected x of shape \(B, 4, L\)"):
        net(torch.randn(1, 3, 5), torch.zeros(1))
    with pytest.raises(ValueError, match="exceeds this model's max_length 8"):
        net(torch.randn(1, 4, 9), torch.zeros(1))
    with pytest.raises(ValueError, match="unconditional"):
        net(torch.randn(1, 4, 5), torch.zeros(1), mr=torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"mr codes must lie in \[0, size\) per slot, sizes \[4, 5\]"):
        tiny_net(mr_sizes=[4, 5])(torch.randn(1, 4, 5), torch.zeros(1), mr=torch.tensor([[4, 0]]))
    with pytest.raises(ValueError, match="at least one real token"):
        net(torch.randn(1, 4, 5), torch.zeros(1), attention_mask=torch.zeros(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="divisible"):
        TextDenoiser(10, hidden=10, heads=4)
    with pytest.raises(ValueError, match="x0-predicting"):
        TextObjective(diffkit.Diffusion("sqrt", 50, "eps"))


@pytest.mark.parametrize("path", ["sqrt", "flow"])
def test_objective_trains_embeddings_apart(path):
    """A few dozen steps on four sentences: the loss falls and the tied head recovers the
    words from their embeddings, i.e. the embeddings did not collapse; on the diffusion path
    and on the flow path, whose times s lie in [0, 1]."""
    net = tiny_net(vocab_size=10, embed_dim=8, hidden=32, max_length=6, time_scale=1000.0 if path == "flow" else 1.0)
    net.train()
    objective = TextObjective(diffkit.Diffusion(path, 50, "x0"))
    ids = torch.tensor([[1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 0, 0], [7, 8, 9, 1, 2, 0], [3, 3, 4, 4, 0, 0]])
    batch = {"ids": ids, "mask": ids != 0}
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for step in range(60):
        loss, terms = objective(net, batch, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert set(terms) == {"mse", "embedding", "rounding", "prior"}
    assert sum(losses[-10:]) < 0.7 * sum(losses[:10])
    with torch.no_grad():
        recovered = net.nearest(net.embed(ids))
    assert torch.equal(recovered[ids != 0], ids[ids != 0])
    weight = net.embedding.weight.detach()
    assert torch.pdist(weight[1:]).min() > 0.1


def test_the_least_noisy_step_is_the_tables_first_point_on_either_path():
    sqrt = diffusion()
    assert scales_at_step(sqrt, 0) == (float(sqrt.schedule.alpha_at(0)), float(sqrt.schedule.sigma_at(0)))
    assert scales_at_step(sqrt, 49) == (float(sqrt.schedule.alpha_at(49)), float(sqrt.schedule.sigma_at(49)))
    # Flow step k is the time s = (k + 1) / T: never clean data, and pure noise at the last.
    flow = diffkit.Diffusion("flow", 50, "x0")
    assert scales_at_step(flow, 0) == pytest.approx((0.98, 0.02), abs=1e-12)
    assert scales_at_step(flow, 49) == pytest.approx((0.0, 1.0), abs=1e-12)


def test_classifier_objective_learns_slots_from_noisy_embeddings():
    """Word 1 in a text means food code 2, word 2 means code 3: after training, the classifier
    reads that from lightly noised embeddings, and log_prob prefers the right code."""
    from modalities.text.model import NoisyMRClassifier
    from modalities.text.objective import ClassifierObjective

    torch.manual_seed(0)
    clf = NoisyMRClassifier(vocab_size=10, embed_dim=4, mr_sizes=[4, 3], hidden=32, depth=1, heads=2,
                            max_length=6, dropout=0.0)
    clf.embedding.copy_(torch.randn(10, 4))
    frozen = clf.embedding.clone()
    ids = torch.randint(3, 10, (64, 6))
    food = torch.randint(0, 2, (64,))
    ids[torch.arange(64), torch.randint(0, 6, (64,))] = 1 + food
    codes = torch.stack([2 + food, torch.ones(64, dtype=torch.long)], dim=1)   # slot 2 absent
    batch = {"ids": ids, "mask": torch.ones_like(ids, dtype=torch.bool), "mr": codes}
    objective = ClassifierObjective(diffkit.Diffusion("sqrt", 50, "x0"))
    opt = torch.optim.Adam(clf.parameters(), lr=3e-3)
    for _ in range(150):
        loss, terms = objective(clf, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.equal(clf.embedding, frozen)  # the denoiser's embeddings are not trained
    clf.eval()
    with torch.no_grad():
        x = clf.embed(ids)
        t = torch.zeros(64)
        right = clf.log_prob(x, t, torch.stack([2 + food, torch.zeros_like(food)], 1))
        wrong = clf.log_prob(x, t, torch.stack([3 - food, torch.zeros_like(food)], 1))
    assert (right > wrong).float().mean() > 0.9


def test_softmax_head_predicts_the_mean_embedding_of_its_word_distribution():
    net = tiny_net(head="softmax")
    x = torch.randn(2, 4, 6)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    x0_hat, logits = net(x, torch.tensor([3.0, 40.0]), attention_mask=mask, return_logits=True)
    assert logits.shape == (2, 6, 12)
    expected = (logits.softmax(-1) @ net.embedding.weight).transpose(1, 2)
    assert torch.allclose(x0_hat[0], expected[0], atol=1e-6)
    assert torch.allclose(x0_hat[1, :, :4], expected[1, :, :4], atol=1e-6)
    assert x0_hat[1, :, 4:].abs().max() == 0  # padding gets no output, as with the regression head
    assert tiny_net()(x, torch.zeros(2), return_logits=True)[1] is None
    with pytest.raises(ValueError, match="unknown head 'mlp'; choose one of regression, softmax"):
        tiny_net(head="mlp")


def test_word_temperature_sharpens_the_distribution_x0_averages():
    net = tiny_net(head="softmax", self_conditioning=True)
    x, t = torch.randn(2, 4, 6), torch.tensor([3.0, 40.0])
    x0_hat, logits = net(x, t, return_logits=True)
    hot, hot_logits = net(x, t, temperature=0.5, return_logits=True)
    expected = ((logits / 0.5).softmax(-1) @ net.embedding.weight).transpose(1, 2)
    assert torch.allclose(hot, expected, atol=1e-6)
    assert torch.equal(hot_logits, logits)  # the logits (training target, bound) stay at temperature 1
    # Near zero temperature x0_hat is the embedding of each position's likeliest word.
    cold = net(x, t, temperature=1e-4)
    assert torch.allclose(cold, net.embed(logits.argmax(-1)), atol=1e-5)
    assert torch.equal(net(x, t, temperature=1.0), x0_hat)
    # The self-conditioning wrapper applies it to every pass of a sampling chain.
    from modalities.text.model import SelfConditioned
    chained = SelfConditioned(net, temperature=0.5)
    first = chained(x, t)
    assert torch.equal(first, hot)
    assert torch.equal(chained(x, t), net(x, t, x0_previous=first, temperature=0.5))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        net(x, t, temperature=0.0)
    with pytest.raises(ValueError, match="regression-head model predicts x0 directly"):
        tiny_net()(x, t, temperature=0.5)


def test_repeat_penalty_moves_the_weaker_of_two_equal_neighbours_off_their_word():
    from modalities.text.model import _word_distribution

    scores = torch.zeros(1, 4, 5)
    scores[0, 0, 3], scores[0, 1, 3], scores[0, 1, 2] = 6.0, 4.0, 3.0  # positions 0 and 1 both lean to word 3
    scores[0, 3, 3] = 9.0  # a padded position: it must not push position 2 (or anyone) around
    scores[0, 2, 3] = 5.0
    mask = torch.tensor([[True, True, True, False]])
    plain = _word_distribution(scores, mask, 0.0)
    assert torch.equal(plain, scores.softmax(-1))
    assert plain[0, :3].argmax(-1).tolist() == [3, 3, 3]
    penalised = _word_distribution(scores, mask, 10.0)
    # The stronger ends keep word 3; the middle one, squeezed from both sides, takes its second choice.
    assert penalised[0, :3].argmax(-1).tolist() == [3, 2, 3]
    assert torch.allclose(penalised.sum(-1), torch.ones(1, 4))
    net = tiny_net(head="softmax")
    x, t = torch.randn(2, 4, 6), torch.tensor([3.0, 40.0])
    assert torch.equal(net(x, t, repeat_penalty=0.0), net(x, t))
    assert not torch.allclose(net(x, t, repeat_penalty=5.0), net(x, t))
    with pytest.raises(ValueError, match="repeat_penalty must be a finite number >= 0"):
        net(x, t, repeat_penalty=-1.0)
    with pytest.raises(ValueError, match="regression-head model predicts x0 directly"):
        tiny_net()(x, t, repeat_penalty=1.0)


def test_self_conditioning_reads_the_previous_estimate():
    net = tiny_net(self_conditioning=True)
    x, t = torch.randn(2, 4, 5), torch.tensor([10.0, 30.0])
    previous = torch.randn(2, 4, 5)
    # No estimate yet means zeros, and the estimate changes the prediction.
    assert torch.equal(net(x, t), net(x, t, x0_previous=torch.zeros_like(x)))
    assert not torch.allclose(net(x, t), net(x, t, x0_previous=previous))
    with pytest.raises(ValueError, match=r"x0_previous must have the shape of x \(2, 4, 5\)"):
        net(x, t, x0_previous=torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="not self-conditioned"):
        tiny_net()(x, t, x0_previous=previous)


def test_self_conditioned_wrapper_chains_estimates_or_makes_two_passes():
    from modalities.text.model import SelfConditioned

    net = tiny_net(self_conditioning=True, head="softmax")
    x1, x2, t = torch.randn(2, 4, 5), torch.randn(2, 4, 5), torch.tensor([10.0, 30.0])
    chained = SelfConditioned(net)
    first = chained(x1, t)
    second = chained(x2, t)
    assert torch.equal(first, net(x1, t))
    assert torch.equal(second, net(x2, t, x0_previous=first))
    # A new batch shape is a new sample: it starts from zeros again.
    x3 = torch.randn(3, 4, 5)
    assert torch.equal(chained(x3, torch.ones(3)), net(x3, torch.ones(3)))
    alone = SelfConditioned(net, chain=False)
    assert torch.equal(alone(x2, t), net(x2, t, x0_previous=net(x2, t)))
    assert torch.equal(alone(x2, t), alone(x2, t))  # no state carried between calls
    with pytest.raises(ValueError, match="self-conditioned TextDenoiser"):
        SelfConditioned(tiny_net())


def test_self_conditioning_carries_over_where_guidance_doubles_or_halves_the_batch():
    """Guided calls see [conditional; unconditional] (2B rows), unguided ones B: where a
    guidance interval ends the conditional half goes on; where one starts both halves continue.
    It used to restart from zeros there, mid-sample."""
    from modalities.text.model import SelfConditioned

    net = tiny_net(self_conditioning=True, head="softmax")
    x, t = torch.randn(2, 4, 5), torch.tensor([10.0, 30.0])
    chained = SelfConditioned(net)
    guided = chained(torch.cat([x, x]), torch.cat([t, t]))
    assert torch.equal(chained(x, t), net(x, t, x0_previous=guided[:2]))
    last = chained.previous
    assert torch.equal(chained(torch.cat([x, x]), torch.cat([t, t])),
                       net(torch.cat([x, x]), torch.cat([t, t]), x0_previous=torch.cat([last, last])))

    # In the core's sampler with the interval ending mid-way, only the first call sees zeros.
    seen = []
    conditional = tiny_net(mr_sizes=[3, 2], self_conditioning=True, head="softmax")
    forward = conditional.forward

    def recording(x, t, **kwargs):
        seen.append(kwargs.get("x0_previous"))
        return forward(x, t, **kwargs)

    conditional.forward = recording
    diffkit.Diffusion("sqrt", 50, "x0").sample(
        SelfConditioned(conditional), (2, 4, 5), steps=6, sampler="ddim", generator=torch.Generator().manual_seed(0),
        guidance_scale=3.0, guidance_interval=(1.0, None), mr=torch.tensor([[1, 1], [2, 0]]))
    rows = [None if previous is None else previous.shape[0] for previous in seen]
    assert 4 in rows and 2 in rows  # the run was guided, then not
    assert seen[0] is None and all(previous is not None and previous.abs().sum() > 0 for previous in seen[1:])


def test_guidance_mixes_the_word_logits_and_stays_a_word_average():
    """x0_hat = sum_w softmax((l_u + s (l_c - l_u)) / T)_w EMB(w): at s = 1 the conditional
    estimate, at s = 0 the unconditional; the x0 mix at the same scale leaves the words' hull."""
    net = tiny_net(mr_sizes=[3, 2], head="softmax")
    x, t = torch.randn(2, 4, 5), torch.tensor([10.0, 30.0])
    mr, mask = torch.tensor([[1, 1], [2, 0]]), torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    keep, drop = torch.zeros(2, dtype=torch.bool), torch.ones(2, dtype=torch.bool)
    conditional, logits_c = net(x, t, mask, mr, drop_cond=keep, temperature=0.5, return_logits=True)
    unconditional, logits_u = net(x, t, mask, mr, drop_cond=drop, temperature=0.5, return_logits=True)
    for scale in (0.0, 1.0, 4.0):
        guided, both = net.guided(x, t, scale, mr=mr, attention_mask=mask, temperature=0.5)
        mixed = (logits_u + scale * (logits_c - logits_u)) / 0.5
        weights = mixed.softmax(-1) * mask[..., None]
        assert torch.allclose(guided, (weights @ net.embedding.weight).transpose(1, 2), atol=1e-5)
        assert torch.allclose(both, torch.cat([conditional, unconditional]), atol=1e-5)
    assert torch.allclose(net.guided(x, t, 1.0, mr=mr, attention_mask=mask, temperature=0.5)[0], conditional, atol=1e-5)
    assert torch.allclose(net.guided(x, t, 0.0, mr=mr, attention_mask=mask, temperature=0.5)[0], unconditional,
                          atol=1e-5)
    # Each coordinate of a word average lies within the words' range at any scale; the x0 mix
    # leaves it (this untrained net's two estimates differ little, so the scale is large).
    low, high = net.embedding.weight.min(0).values[:, None], net.embedding.weight.max(0).values[:, None]
    guided = net.guided(x, t, 100.0, mr=mr, attention_mask=mask, temperature=0.5)[0][0]
    assert bool(((guided >= low - 1e-6) & (guided <= high + 1e-6)).all())
    x0_mix = (unconditional + 100.0 * (conditional - unconditional))[0]
    assert not bool(((x0_mix >= low) & (x0_mix <= high)).all())
    # A regression head has no logits: it mixes its x0 estimates.
    regression = tiny_net(mr_sizes=[3, 2], head="regression")
    c = regression(x, t, mask, mr, drop_cond=keep)
    u = regression(x, t, mask, mr, drop_cond=drop)
    assert torch.allclose(regression.guided(x, t, 3.0, mr=mr, attention_mask=mask)[0], u + 3.0 * (c - u), atol=1e-5)


def test_the_wrappers_mix_where_guidance_mix_says_and_carry_both_halves_on():
    from modalities.text.model import SelfConditioned, WordOptions

    net = tiny_net(mr_sizes=[3, 2], self_conditioning=True, head="softmax")
    x, t, mr = torch.randn(2, 4, 5), torch.tensor([10.0, 30.0]), torch.tensor([[1, 1], [2, 0]])
    chained = SelfConditioned(net, temperature=0.5)
    guided = chained.classifier_free_guidance(x, t, 3.0, mr=mr)
    assert torch.equal(guided, net.guided(x, t, 3.0, mr=mr, temperature=0.5)[0])
    both = chained.previous
    assert both.shape[0] == 4
    # The next guided call continues both halves; an unguided one the conditional half.
    assert torch.equal(chained.classifier_free_guidance(x, t, 3.0, mr=mr),
                       net.guided(x, t, 3.0, mr=mr, temperature=0.5, x0_previous=both)[0])
    last = chained.previous
    assert torch.equal(chained(x, t, mr=mr), net(x, t, mr=mr, temperature=0.5, x0_previous=last[:2]))
    assert SelfConditioned(net, guidance_mix="x0").classifier_free_guidance is None
    plain = tiny_net(mr_sizes=[3, 2], head="softmax")
    assert torch.equal(WordOptions(plain, temperature=0.5).classifier_free_guidance(x, t, 3.0, mr=mr),
                       plain.guided(x, t, 3.0, mr=mr, temperature=0.5)[0])
    assert WordOptions(plain, guidance_mix="x0").classifier_free_guidance is None
    for wrapper in (lambda mix: SelfConditioned(net, guidance_mix=mix), lambda mix: WordOptions(plain, guidance_mix=mix)):
        with pytest.raises(ValueError, match="guidance_mix must be one of 'logits', 'x0'"):
            wrapper("eps")


def test_objective_self_conditioning_and_word_term():
    net = tiny_net(self_conditioning=True, head="softmax")
    batch = batch_with_padding()
    batch.pop("mr")
    t = torch.tensor([10, 30])
    noise = torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(1))

    def terms(prob):
        objective = TextObjective(diffusion(), self_condition_prob=prob, t0_fraction=0.0)
        return objective.loss(net, batch, t=t, noise=noise, generator=torch.Generator().manual_seed(2))[1]

    never, always = terms(0.0), terms(1.0)
    assert set(never) == {"mse", "embedding", "rounding", "prior", "words"}
    # With its own first estimate fed back the prediction, hence the loss, changes.
    assert not torch.allclose(never["mse"], always["mse"])
    # The words term is the softmax head's cross-entropy at real tokens only.
    x_t = diffusion().q_sample(net.embed(batch["ids"]), t.double(), noise)
    _, logits = net(x_t, t.float(), attention_mask=batch["mask"], return_logits=True)
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["ids"], reduction="none")
    expected = ((ce * batch["mask"]).sum(1) / batch["mask"].sum(1)).mean()
    assert torch.allclose(never["words"], expected, atol=1e-5)

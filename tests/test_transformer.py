"""The Transformer language model as blocks: closed-form tangents against torch.func.jvp, the
head-input signal against autograd, the position-shared J_hat against the true Jacobian, and
one trajectory whatever the stage split."""

from __future__ import annotations

import pytest
import torch
from torch.func import jacrev, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from grape_dist.build import build_engine
from grape_dist.config import load_config
from grape_dist.metrics.alignment import probe_alignment
from grape_dist.models.transformer import build_transformer
from grape_dist.rules import MicroBatch, build_stage_rule, output_signal
from grape_dist.rules.feedback import jacobian_estimate
from grape_dist.rules.tangents import block_forward
from grape_dist.runtime import Layout

VOCAB, CONTEXT, D = 11, 6, 8


def model(feedback="macro", layers=2, seed=0):
    return build_transformer(VOCAB, CONTEXT, D, layers, 2, feedback).materialize(seed=seed)


def tokens(n, seed=0):
    return torch.randint(0, VOCAB, (n, CONTEXT), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("streams", [1, 3])  # one stream takes torch's fused derivative kernels
@pytest.mark.parametrize("feedback", ["macro", "micro"])
def test_block_tangents_match_torch_func_jvp(feedback, streams):
    """Attention (causal softmax), MLP (GELU), LayerNorm and the head, K streams on chosen rows:
    each stream equals torch.func.jvp of the block at those rows (float64)."""
    m = model(feedback).double()
    h = m.blocks[0](tokens(5))
    rows = torch.tensor([0, 3, 4])
    for block in list(m.blocks)[1:]:
        t = torch.randn(streams, len(rows), *h.shape[1:], dtype=torch.double)
        y, tt = block_forward(block, h, t, rows)
        for k in range(streams):
            with sdpa_kernel([SDPBackend.MATH]):  # the flash kernel has no forward AD
                _, ref = jvp(block, (h[rows],), (t[k],))
            torch.testing.assert_close(tt[k], ref, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(y, block(h))
        h = y


def test_the_broadcast_error_is_the_exact_gradient_at_the_head_input():
    m = model()
    cfg = load_config(None, ["rule=dfa"])
    rule = build_stage_rule(cfg, m, 0, len(m.blocks))
    x, y = tokens(4), tokens(4, seed=1)
    mb = MicroBatch(0, 0, 0, 4, 4)
    h, t = rule.forward(mb, x, None)
    _, _, sig = output_signal(h, y, 4, t)
    sig = rule.signal_at_output(mb, sig)
    # Autograd: the mean token cross-entropy, differentiated at the head's input.
    hid = m.blocks[0](x)
    for b in list(m.blocks)[1:-1]:
        hid = b(hid)
    hid = hid.detach().requires_grad_()
    logits = m.blocks[-1](hid)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()).backward()
    assert sig.error.shape == (4 * CONTEXT, D)
    torch.testing.assert_close(sig.error, hid.grad.reshape(-1, D), rtol=1e-5, atol=1e-8)
    rule.reset_step()


def test_position_shared_jacobian_estimate_is_unbiased():
    """With B shared over positions, E[J_hat] = sum over samples and positions t of the (t, t)
    block of d(head input)/d(block output): checked against jacrev over many tangent draws."""
    torch.manual_seed(0)
    m = model(layers=1).double()
    x = tokens(2)
    h0 = m.blocks[0](x)
    block = m.blocks[1]
    with sdpa_kernel([SDPBackend.MATH]):
        jac = jacrev(lambda z: block(z))(h0)  # (2, T, D, 2, T, D)
    exact = sum(jac[s, t, :, s, t, :] for s in range(2) for t in range(CONTEXT))
    draws = 20000
    p = torch.randn(draws, 2, CONTEXT, D, dtype=torch.double)
    _, g = block_forward(block, h0, p)
    est = jacobian_estimate(g.reshape(draws * 2, CONTEXT, D),
                            p.reshape(draws * 2, CONTEXT, D)) / draws
    err = (est - exact).norm() / exact.norm()
    assert err < 0.05, err
    # The same estimate with positions flattened into one feature axis would be another matrix.
    flat = g[0].reshape(2, -1).T @ p[0].reshape(2, -1)
    assert (est - flat[:D, :D]).norm() > 0


@pytest.mark.parametrize("rule,extra", [("bp", []), ("dfa", []),
                                        ("grape", ["grape.tangent_samples=3"]),
                                        ("grape", ["grape.routing=shared"]),
                                        ("dfa", ["feedback.points=layer"]),
                                        ("grape", ["feedback.points=layer",
                                                   "grape.tangent_samples=3"])])
@pytest.mark.parametrize("feedback", ["macro", "micro"])
def test_stage_splits_and_micro_batches_follow_one_trajectory(rule, extra, feedback):
    x, y = tokens(6), tokens(6, seed=1)

    def run(stages, micro, bounds):
        cfg = load_config(None, [f"rule={rule}", *extra, "optim.name=sgd", "optim.lr=0.5",
                                 f"pipeline.micro_batches={micro}"])
        m = build_transformer(VOCAB, CONTEXT, D, 2, 2, feedback)
        engine = build_engine(cfg, m, Layout.in_process(stages), torch.device("cpu"), bounds)
        losses = [engine.train_step(x, y, s).loss_sum for s in range(3)]
        return losses, torch.cat([p.detach().flatten() for p in m.parameters()])

    n = 4 if feedback == "macro" else 6
    one = run(1, 1, None)
    split = run(3, 2, [(0, 1), (1, n - 1), (n - 1, n)])
    assert split[0] == pytest.approx(one[0], rel=1e-5)
    torch.testing.assert_close(split[1], one[1], rtol=1e-4, atol=1e-6)
    assert one[0][-1] < one[0][0]  # and it learns


def test_drtp_is_refused_for_a_language_model():
    with pytest.raises(ValueError, match="DRTP"):
        build_stage_rule(load_config(None, ["rule=drtp"]), model(), 0, 4)


# -- the probe, the data and the trainer --------------------------------------------------------

def test_alignment_probe_on_the_language_model_matches_a_full_backward():
    """grad_cos per token: cos(e_h B_l, dL/dh_l) with e_h the exact error at the head's input,
    against autograd through the whole model; jhat_cos with the position-shared estimate."""
    from torch.nn import functional as F

    from grape_dist.rng import keyed_generator
    from grape_dist.rules.feedback import frobenius_cosine

    torch.set_default_dtype(torch.float64)
    try:
        m = build_transformer(VOCAB, CONTEXT, D, 2, 2, "micro")
        cfg = load_config(None, ["rule=grape"])
        engine = build_engine(cfg, m, Layout.in_process(3), torch.device("cpu"),
                              [(0, 2), (2, 4), (4, 6)])
        x, y = tokens(5), tokens(5, seed=1)
        engine.train_step(x, y, 0)
        got = probe_alignment(engine, x, y, seed=3, max_outputs=1000)
        fb = {i: b for s in engine.stages for i, b in s.rule.feedback_matrices().items()}
        blocks = list(m.blocks)
        hs, h = [], x
        for b in blocks[:-1]:
            h = b(h)
            hs.append(h)
        logits = blocks[-1](h)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        grads = torch.autograd.grad(loss, hs)
        e_h = grads[-1].reshape(-1, D)  # the head's input is the last hidden block's output
        assert set(got) == {b.name for b in blocks[:-1]}
        for i, b in enumerate(blocks[:-1]):
            cos = F.cosine_similarity(e_h @ fb[i], grads[i].reshape(-1, D), dim=1, eps=1e-12)
            assert got[b.name]["grad_cos"] == pytest.approx(float(cos.mean()), rel=1e-7)
            assert "jac_cos" not in got[b.name]
            p = torch.randn(hs[i].shape, generator=keyed_generator(3, "probe", i))
            t, hh = p.unsqueeze(0), hs[i].detach()
            with torch.no_grad():
                for later in blocks[i + 1:-1]:
                    hh, t = block_forward(later, hh, t)
            ref = frobenius_cosine(fb[i], jacobian_estimate(t[0], p))
            assert got[b.name]["jhat_cos"] == pytest.approx(ref, rel=1e-7)
    finally:
        torch.set_default_dtype(torch.float32)


def test_character_windows_and_their_errors(tmp_path):
    from grape_dist.data.text import TextDataUnavailableError, encode, load_text_dataset

    folder = tmp_path / "shakespeare"
    folder.mkdir()
    (folder / "train.txt").write_text("abcdefghij" * 3)
    (folder / "test.txt").write_text("ABCDEFGHIJK")
    ds = load_text_dataset("shakespeare", tmp_path, 4)
    assert ds.train_x.shape == (7, 4) and ds.test_x.shape == (2, 4)
    assert ds.train_x[1].tolist() == [ord(c) for c in "efgh"]
    assert ds.train_y[1].tolist() == [ord(c) for c in "fghi"]  # the next character
    with pytest.raises(ValueError, match="not ASCII"):
        encode("caf\u00e9")
    with pytest.raises(TextDataUnavailableError, match="test.txt not found"):
        (folder / "test.txt").unlink()
        load_text_dataset("shakespeare", tmp_path, 4)


def test_the_language_model_is_only_for_text():
    from grape_dist.config import ConfigError
    with pytest.raises(ConfigError, match="model.name"):
        load_config(None, ["model.name=transformer"])
    with pytest.raises(ConfigError, match="model.name"):
        load_config(None, ["data.name=shakespeare"])
    with pytest.raises(ConfigError, match="rule"):
        load_config(None, ["data.name=shakespeare", "model.name=transformer", "rule=drtp"])
    with pytest.raises(ConfigError, match="model.heads"):
        load_config(None, ["data.name=shakespeare", "model.name=transformer", "model.heads=3"])


def test_a_short_shakespeare_run_reports_perplexity(tmp_path):
    import json

    from helpers import SHARED_DATA

    from grape_dist.trainer import Trainer
    if not (SHARED_DATA / "shakespeare" / "train.txt").is_file():
        pytest.skip("the Shakespeare corpus is not beside the project")
    cfg = load_config(None, [
        "rule=grape", "model.name=transformer", "model.d_model=32", "model.layers=2",
        "model.heads=2", "data.name=shakespeare", f"data.root={SHARED_DATA}", "data.seq_len=32",
        "data.batch_size=16", "data.train_subset=512", "data.test_subset=64", "train.epochs=2",
        "train.progress=false", "optim.lr=3e-3", "calibration.every_epochs=1"])
    summary = Trainer(cfg, tmp_path).fit()
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    test = [r for r in rows if r["split"] == "test"]
    assert summary["final_test_perplexity"] == pytest.approx(test[-1]["perplexity"])
    assert summary["best_test_perplexity"] == min(r["perplexity"] for r in test)
    # Loss is per token: perplexity = exp(loss), far below the 128-way uniform guess.
    assert test[-1]["perplexity"] == pytest.approx(torch.tensor(test[-1]["loss"]).exp().item())
    assert summary["final_test_perplexity"] < 40
    assert set(test[-1]["alignment"]) == {"embed", "layer0", "layer1"}

"""ROME's per-token causal trace (`localize.causal_trace_tokens`) on the tiny random model."""

import numpy as np
import pytest
import torch

from mechunlearn_utils import localize as lz
from mechunlearn_utils.data.datasets import load_athletes
from mechunlearn_utils.viz.circuits_plots import plot_token_trace


@pytest.fixture(scope="module")
def facts(tiny):
    """Athletes whose sport the random tiny model happens to rank first."""
    every = lz.sports_facts(tiny, load_athletes())
    top = lz.run_sites(tiny, every.batch()).logits.gather(1, every.cand_ids).argmax(1)
    return every.subset([i for i in range(len(every)) if top[i] == every.correct[i]][:3])


def test_restoring_every_position_of_a_layer_recovers_the_clean_p(tiny, facts):
    T = int(facts.last_index[0]) + 1
    subject = facts.subject_pos[0]
    trace = lz.causal_trace_tokens(tiny, facts, 0, positions=[range(T), subject], noise_scale=10.0)
    assert abs(trace.p_clean - trace.p_noised) > 0.05 * trace.p_clean, "the noise changed nothing"
    np.testing.assert_allclose(trace.p["resid_pre"][0], trace.p_clean, rtol=1e-4)  # at every layer
    # layer 0, the subject's tokens only: the noise sits there alone, so this restores the clean run too
    np.testing.assert_allclose(trace.p["resid_pre"][1, 0], trace.p_clean, rtol=1e-4)
    assert trace.labels[0] == f"0..{T - 1}" and len(trace.labels) == 2


def test_per_token_trace_shape_prefix_and_batching(tiny, facts):
    T = int(facts.last_index[1]) + 1
    a = lz.causal_trace_tokens(tiny, facts, 1, batch_size=5, seed=1)
    b = lz.causal_trace_tokens(tiny, facts, 1, batch_size=500, seed=1, kinds=("resid_pre",), layers=[1])
    assert set(a.p) == set(lz.TRACE_KINDS) and all(v.shape == (T, tiny.n_layers) for v in a.p.values())
    assert len(a.labels) == T and a.layers == list(range(tiny.n_layers)) and b.layers == [1]
    np.testing.assert_allclose(a.p["resid_pre"][:, 1], b.p["resid_pre"][:, 0], atol=1e-6)
    first = min(a.subject_positions)
    assert (a.p["mlp_out"][:first] == a.p_noised).all()  # before the subject nothing differs: no run needed
    assert not np.allclose(a.p["resid_pre"][first:, 0], a.p_noised)  # restoring a subject token matters
    with pytest.raises(ValueError, match="not both"):
        lz.replace_rows(torch.zeros(1, 2, 2, 2), torch.tensor([0]), [0], heads=[0], positions=[[0]])


def test_plot_token_trace_draws_positions_by_layers(tiny, facts):
    trace = lz.causal_trace_tokens(tiny, facts, 0, kinds=("resid_pre", "mlp_out"))
    fig = plot_token_trace(trace, "tiny")
    assert len(fig.axes) >= 2
    ax = fig.axes[0]
    shown = [t.get_text() for t in ax.get_yticklabels()]
    assert shown == [t + "*" * (i in trace.subject_positions) for i, t in enumerate(trace.labels)]
    data = ax.collections[0].get_array().reshape(len(trace.labels), len(trace.layers))
    np.testing.assert_allclose(data, trace.p["resid_pre"])

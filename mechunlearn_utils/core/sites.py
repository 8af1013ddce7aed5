"""One vocabulary for every activation the library reads or writes, and one way to hook it.

A `Site` names one activation: ``kind`` (one of `SITE_KINDS`) at block ``layer``. The names are
unambiguous about Gemma's sublayer norms (Gemma 2/3 norm each sublayer's output before adding it
to the residual stream):

* ``mlp_out_prenorm``: what the MLP module returns (down_proj's output; TL ``mlp.hook_out``),
  *before* the post-feedforward norm; ``mlp_out``: what the MLP adds to the residual stream, after
  that norm (TL ``hook_mlp_out``). ``z`` (per head, before o_proj) and ``attn_out`` (what attention
  adds to the residual stream, after the post-attention norm; TL ``hook_attn_out``) likewise.
  On models without those norms (Llama) each pair is the same tensor.

`run_sites` runs one forward pass (and optionally one backward pass) with edits and captures at
sites on three backends: TransformerLens hook points of the `TransformerBridge`, which live inside
the HF modules (``backend="tl"``); nnsight (``"nnsight"``: ``model.model.layers[l].mlp`` ... of any
HF decoder model, so the same call works on a large or remote model); plain PyTorch hooks on those
same HF modules (``"hf"``: no extra library, and it never builds the bridge).

Positions are named too: `SITE_POSITIONS` (``subject_first``, ``subject_last``, ``final``) and
`position_roles` (a role per token, so prompts with subjects of different lengths line up).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from mechunlearn_utils.core.logits import final_logits

BACKENDS = ("tl", "nnsight", "hf")

# in forward order within a block (nnsight visits sites in that order)
SITE_KINDS = ("embed", "resid_pre", "q", "k", "v", "z", "attn_out", "resid_mid", "mlp_in", "mlp_pre",
              "mlp_post", "mlp_out_prenorm", "mlp_out", "resid_post", "resid_final")
HEAD_KINDS = ("q", "k", "v", "z")  # shaped [batch, pos, head, d_head]
MLP_KINDS = ("mlp_in", "mlp_pre", "mlp_post", "mlp_out_prenorm")  # inside the MLP module
_ORDER = {k: i for i, k in enumerate(SITE_KINDS)}
# The residual-stream components activation patching sweeps over (TransformerLens hook names).
PATCH_COMPONENTS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")


@dataclass(frozen=True)
class Site:
    """One activation: ``kind`` in SITE_KINDS at block ``layer`` (None for embed / resid_final).

    * q/k/v: the q/k/v_proj outputs, [batch, pos, head, d_head] (k/v have the KV heads)
    * z: the input of o_proj (each head's output before mixing), [batch, pos, head, d_head]
    * mlp_in: the MLP's input (after the pre-MLP norm), [batch, pos, d_model]
    * mlp_pre: the gate projection's output (TL hook_pre), [batch, pos, d_mlp]
    * mlp_post: the MLP's hidden activations (input of down_proj, TL hook_post), [batch, pos, d_mlp]
    * mlp_out_prenorm: the MLP module's output, BEFORE Gemma's post-feedforward norm (TL
      ``mlp.hook_out``), [batch, pos, d_model]
    * mlp_out: what the MLP adds to the residual stream, AFTER that norm (TL ``hook_mlp_out``)
    * attn_out: what attention adds to the residual stream, after Gemma's post-attention norm (TL
      ``hook_attn_out``), [batch, pos, d_model]
    * resid_pre / resid_mid / resid_post: the residual stream entering block ``layer`` / after its
      attention / leaving it; resid_final: entering the final norm
    """

    kind: str
    layer: int | None = None

    def __post_init__(self):
        if self.kind not in SITE_KINDS:
            raise ValueError(f"unknown site kind {self.kind!r}; choose one of {SITE_KINDS}")
        if (self.layer is None) != (self.kind in ("embed", "resid_final")):
            raise ValueError(f"site {self.kind!r} {'needs' if self.layer is None else 'takes no'} a layer")

    def order(self) -> tuple:
        if self.kind == "embed":
            return (-1, 0)
        if self.kind == "resid_final":
            return (10 ** 9, 0)
        return (self.layer, _ORDER[self.kind])

    def tl_name(self) -> str:
        return {"embed": "hook_embed", "resid_final": "ln_final.hook_in",
                "resid_pre": f"blocks.{self.layer}.hook_resid_pre",
                "q": f"blocks.{self.layer}.attn.hook_q", "k": f"blocks.{self.layer}.attn.hook_k",
                "v": f"blocks.{self.layer}.attn.hook_v", "z": f"blocks.{self.layer}.attn.hook_z",
                "mlp_in": f"blocks.{self.layer}.mlp.hook_in",
                "mlp_pre": f"blocks.{self.layer}.mlp.hook_pre",
                "mlp_post": f"blocks.{self.layer}.mlp.hook_post",
                "mlp_out_prenorm": f"blocks.{self.layer}.mlp.hook_out",
                "attn_out": f"blocks.{self.layer}.hook_attn_out",
                "resid_mid": f"blocks.{self.layer}.hook_resid_mid",
                "mlp_out": f"blocks.{self.layer}.hook_mlp_out",
                "resid_post": f"blocks.{self.layer}.hook_resid_post"}[self.kind]

    def __str__(self) -> str:
        return self.kind if self.layer is None else f"{self.kind}{self.layer}"


@dataclass
class PassCounter:
    """Model passes spent: calls (batches) and sequences (rows), forward and backward."""

    forward: int = 0
    backward: int = 0
    forward_sequences: int = 0
    backward_sequences: int = 0

    def add(self, n_rows: int, backward: bool = False) -> None:
        self.forward += 1
        self.forward_sequences += n_rows
        if backward:
            self.backward += 1
            self.backward_sequences += n_rows

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class RunResult:
    logits: torch.Tensor  # [batch, vocab] at each prompt's last token
    acts: dict
    grads: dict
    metric: torch.Tensor | None = None


def head_dim(model) -> int:
    cfg = model.hf.config
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def run_sites(model, batch: dict, edits: dict | None = None, capture=(), backend: str = "tl",
              grad_metric=None, counter: PassCounter | None = None, start: int = 0,
              hidden: torch.Tensor | None = None) -> RunResult:
    """One forward pass with edits and captures at sites, and optionally one backward pass.

    * ``edits``: {Site: fn(activation) -> new activation} (head sites see [batch, pos, head, d_head])
    * ``capture``: sites whose activation (after any edit) is returned in ``.acts``
    * ``grad_metric``: fn(logits [batch, vocab]) -> per-row metric; when given, the gradient of its
      sum w.r.t. every captured site is returned in ``.grads`` (the model's weights stay frozen)
    * ``start``, ``hidden``: run only layers[start:], from `hidden` (the residual stream entering
      layer `start`, e.g. captured at ``Site("resid_pre", start)`` of an earlier run); sites below
      `start` never fire. The "tl" and "hf" backends.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if hidden is not None and backend == "nnsight":
        raise ValueError("run_sites(hidden=...) runs on the 'tl' and 'hf' backends, not nnsight")
    if hidden is not None and any(s.layer is not None and s.layer < start or s.kind == "embed"
                                  for s in [*(edits or {}), *capture]):
        raise ValueError(f"a site below layer {start} never fires when the run starts there")
    edits = dict(edits or {})
    capture = list(dict.fromkeys(capture))
    run = {"tl": _run_tl, "nnsight": _run_nnsight, "hf": _run_hf}[backend]
    start_at = {} if hidden is None else dict(start=start, hidden=hidden.to(model.hf.device))
    with torch.set_grad_enabled(grad_metric is not None):
        out = run(model, batch, edits, capture, grad_metric, **start_at)
    if counter is not None:
        counter.add(len(batch["input_ids"]), backward=grad_metric is not None)
    return out


def _run_tl(model, batch, edits, capture, metric, **start_at) -> RunResult:
    """TransformerLens: bridge hook points (inside the HF modules) + last-token unembedding."""
    tl = model.tl
    acts, grads = {}, {}
    need_grad = metric is not None
    sites = set(edits) | set(capture) | ({Site("embed")} if need_grad else set())
    fwd, bwd = [], []
    for site in sites:
        def fwd_hook(x, hook, site=site):
            if site in edits:
                x = edits[site](x)
            if need_grad and site.kind == "embed":
                x = x.detach().requires_grad_(True)  # frozen weights: start the graph here
            if site in acts or site in capture:
                acts[site] = x
            return x
        fwd.append((site.tl_name(), fwd_hook))
        if need_grad and site in capture:
            bwd.append((site.tl_name(), lambda g, hook, site=site: grads.__setitem__(site, g.detach())))
    kwargs = {k: v.to(model.hf.device) for k, v in batch.items()}
    with tl.hooks(fwd_hooks=fwd, bwd_hooks=bwd):
        logits = final_logits(model, **kwargs, **start_at)
        value = None
        if need_grad:
            value = metric(logits)
            value.sum().backward()
    missing = [str(s) for s in capture if s not in acts]
    if missing:
        raise RuntimeError(f"TransformerLens hooks never fired for sites {missing}")
    return RunResult(logits.detach(), {s: a.detach() for s, a in acts.items() if s in capture},
                     grads, None if value is None else value.detach())


def is_gemma_style(layer) -> bool:
    """Gemma 2/3 blocks norm each sublayer's output (post_attention / post_feedforward norms)."""
    return hasattr(layer, "pre_feedforward_layernorm") and hasattr(layer, "post_feedforward_layernorm")


def _site_target(base, site: Site):
    """(submodule, 'input'|'output') of a site under a decoder root `base` (HF `model.model`, or
    its nnsight envoy: both have the same attribute tree)."""
    if site.kind == "embed":
        return base.embed_tokens, "output"
    if site.kind == "resid_final":
        return base.norm, "input"
    layer = base.layers[site.layer]
    if site.kind == "resid_post":
        return (base.layers[site.layer + 1], "input") if site.layer + 1 < len(base.layers) else (base.norm, "input")
    gemma = is_gemma_style(layer)
    if site.kind in ("attn_out", "resid_mid", "mlp_out"):
        return {"attn_out": (layer.post_attention_layernorm, "output") if gemma else (layer.self_attn.o_proj, "output"),
                "resid_mid": (layer.pre_feedforward_layernorm if gemma else layer.post_attention_layernorm, "input"),
                "mlp_out": (layer.post_feedforward_layernorm, "output") if gemma else (layer.mlp, "output")}[site.kind]
    return {"resid_pre": (layer, "input"), "q": (layer.self_attn.q_proj, "output"),
            "k": (layer.self_attn.k_proj, "output"), "v": (layer.self_attn.v_proj, "output"),
            "z": (layer.self_attn.o_proj, "input"), "mlp_in": (layer.mlp, "input"),
            "mlp_pre": (layer.mlp.gate_proj, "output"), "mlp_post": (layer.mlp.down_proj, "input"),
            "mlp_out_prenorm": (layer.mlp, "output")}[site.kind]


def _nn_envoy(nn, site: Site):
    """(envoy, 'input'|'output') of a site in any HF decoder model (model.model.layers[l]...)."""
    return _site_target(nn.model, site)


def _hf_module(model, site: Site):
    """(module, 'input'|'output') of a site: the same HF modules nnsight uses."""
    return _site_target(model.hf.model, site)


def _run_hf(model, batch, edits, capture, metric, **start_at) -> RunResult:
    """Plain PyTorch forward hooks / pre-hooks on the HF modules."""
    dh = head_dim(model)
    need_grad = metric is not None
    sites = set(edits) | set(capture) | ({Site("embed")} if need_grad else set())
    acts: dict = {}

    def apply(site, x):
        shaped = x.view(*x.shape[:-1], -1, dh) if site.kind in HEAD_KINDS else x
        if site in edits:
            shaped = edits[site](shaped)
        if need_grad and site.kind == "embed":
            shaped = shaped.detach().requires_grad_(True)
        if site in capture:
            if need_grad and shaped.requires_grad:
                shaped.retain_grad()
            acts[site] = shaped
        return shaped.reshape(x.shape)

    def out_hook(site):
        return lambda mod, args, out: apply(site, out)

    def in_hook(site):
        def hook(mod, args, kwargs):
            if args:
                return (apply(site, args[0]), *args[1:]), kwargs
            key = next(iter(kwargs))
            return args, {**kwargs, key: apply(site, kwargs[key])}
        return hook

    handles = []
    try:
        for site in sites:
            mod, where = _hf_module(model, site)
            handles.append(mod.register_forward_hook(out_hook(site)) if where == "output"
                           else mod.register_forward_pre_hook(in_hook(site), with_kwargs=True))
        kwargs = {k: v.to(model.hf.device) for k, v in batch.items()}
        logits = final_logits(model, **kwargs, **start_at)
        value = None
        if need_grad:
            value = metric(logits)
            value.sum().backward()
    finally:
        for h in handles:
            h.remove()
    grads = {s: a.grad.detach() for s, a in acts.items() if need_grad and a.grad is not None}
    return RunResult(logits.detach(), {s: a.detach() for s, a in acts.items()}, grads,
                     None if value is None else value.detach())


def _run_nnsight(model, batch, edits, capture, metric) -> RunResult:
    """nnsight: sites are module inputs/outputs, visited in forward order (nnsight 0.8 requires it)."""
    nn = model.nn
    dh = head_dim(model)
    need_grad = metric is not None
    sites = sorted(set(edits) | set(capture) | ({Site("embed")} if need_grad else set()),
                   key=Site.order)
    kwargs = {k: v.to(model.hf.device) for k, v in batch.items()}
    raw, grads, box = {}, {}, {}  # filled inside the trace (nnsight runs the block itself)
    with nn.trace(kwargs["input_ids"], attention_mask=kwargs["attention_mask"],
                  logits_to_keep=kwargs["last_index"][:, None]):
        for site in sites:
            env, attr = _nn_envoy(nn, site)
            act = getattr(env, attr)
            changed = False
            if site in edits:
                shaped = act.view(*act.shape[:-1], -1, dh) if site.kind in HEAD_KINDS else act
                act = edits[site](shaped).reshape(act.shape)
                changed = True
            if need_grad and site.kind == "embed":
                act = act.detach().requires_grad_(True)
                changed = True
            if changed:
                setattr(env, attr, act)
            if site in capture:
                raw[site] = act.save()
        box["logits"] = nn.output.logits[:, 0].save()
        if need_grad:
            box["metric"] = metric(box["logits"]).save()
            with box["metric"].sum().backward():
                for site in reversed([s for s in sites if s in capture]):
                    grads[site] = raw[site].grad.save()
    logits, value = box["logits"], box.get("metric")
    fix = lambda s, t: t.detach().view(*t.shape[:-1], -1, dh) if s.kind in HEAD_KINDS else t.detach()  # noqa: E731
    return RunResult(logits.detach(), {s: fix(s, t) for s, t in raw.items()},
                     {s: fix(s, g) for s, g in grads.items()}, None if value is None else value.detach())




# --------------------------------------------------------------------------- edits

def add_rows(delta: torch.Tensor):
    """Edit that adds `delta` (same shape as the activation) to it."""
    def edit(a):
        return a + delta.to(a.device, a.dtype)
    return edit


def replace_rows(source: torch.Tensor, f_idx: torch.Tensor, rows: list[int], heads: list[int] | None = None,
                 positions: list[list[int]] | None = None):
    """Edit that writes another run's activation into batch rows `rows` (for head sites: only
    `heads`): row r gets ``source[f_idx[r]]`` (a clean activation restored into a noised run, or a
    corrupt one patched into a clean run); with `positions`, only at the positions
    ``positions[i]`` of row ``rows[i]`` (ROME's per-token trace; not with `heads`). A run on a batch
    trimmed of padding columns (`FactSet.batch(trim=True)`) gets the source's first positions."""
    rows_t = torch.tensor(rows)
    src_rows = f_idx[rows_t]
    if positions is not None and heads is not None:
        raise ValueError("replace_rows restores either some heads or some positions, not both")

    def edit(a):
        a = a.clone()
        width = a.shape[1]
        if positions is not None:
            keep = torch.zeros(len(rows), a.shape[1], dtype=torch.bool)
            for i, pos in enumerate(positions):
                keep[i, list(pos)] = True
            keep = keep.to(a.device)[..., None]
            a[rows_t] = torch.where(keep, source[src_rows, :width].to(a.device, a.dtype), a[rows_t])
        elif heads is None:
            a[rows_t] = source[src_rows, :width].to(a.device, a.dtype)
        else:
            h = torch.tensor(heads)
            a[rows_t, :, h] = source[src_rows, :width, h].to(a.device, a.dtype)
        return a
    return edit




# --------------------------------------------------------------------------- named positions

SITE_POSITIONS = {"subject_last": lambda subj, T: subj[-1], "subject_first": lambda subj, T: subj[0],
                  "final": lambda subj, T: T - 1}


def position_roles(tokens: list[str], subject_positions: list[int]) -> list[str]:
    """A role per position so prompts with subjects of different lengths line up.

    Before the subject: ``"{i}:{token}"`` (the shared prefix); the subject: ``subj first``,
    ``subj mid`` (any middle tokens), ``subj last``; after it: ``"+{k}:{token}"``.
    """
    if not subject_positions:
        raise ValueError("subject_positions is empty")
    s0, s1 = subject_positions[0], subject_positions[-1]
    roles = []
    for i, tok in enumerate(tokens):
        if i < s0:
            roles.append(f"{i}:{tok}")
        elif i == s1:
            roles.append("subj last")
        elif i == s0:
            roles.append("subj first")
        elif i < s1:
            roles.append("subj mid")
        else:
            roles.append(f"+{i - s1}:{tok}")
    return roles


def role_key(role: str):
    """Sort key of a `position_roles` role: prefix, then the subject, then what follows."""
    if role.startswith("subj"):
        return (1, ["subj first", "subj mid", "subj last"].index(role))
    if role.startswith("+"):
        return (2, int(role[1:].split(":")[0]))
    return (0, int(role.split(":")[0]))

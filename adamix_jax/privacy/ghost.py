"""Per-example gradient norms and clipped sums without per-example gradients.

DP-SGD needs, for every example i, the norm ||g_i|| of its gradient and then
the weighted sum sum_i w_i g_i with w_i = min(1, C / ||g_i||). The reference
(``per_example.per_example_grads``) materialises every g_i: B x P floats and
B small backward passes. Most of a network's parameters sit in layers whose
per-example gradient is a sum of outer products of two things the ordinary
forward and backward passes already compute: the layer's INPUT a_i and the
gradient of the loss with respect to its OUTPUT, gamma_i = d loss_i / d out_i.

* Dense (kernel din x dout, T positions): g_i = sum_t a_it gamma_it^T, so
  ||g_i||^2 = sum_{t,s} (a_it . a_is)(gamma_it . gamma_is)  (the "ghost
  norm", Li et al. 2022), or the materialised outer product when
  T^2 (din + dout) > T din dout.
* Conv: the same with a_it the unfolded k x k x Cin patch at output
  position t (Bu et al.'s "mixed ghost norm": per layer, the Gram form costs
  ~T^2 (K + Cout), the unfolded per-example gradient ~T K Cout; the cheaper
  one is chosen statically from the shapes).
* Embed: g_i = sum_t onehot(id_it) gamma_it^T, so ||g_i||^2 =
  sum_{t,s} [id_it = id_is] (gamma_it . gamma_is).
* LayerNorm / GroupNorm / RMSNorm / InstanceNorm (no batch statistics): the
  per-example gradients of their few parameters are materialised directly,
  by re-applying the layer to each captured input and pulling back the
  captured cotangent.

The weighted sum is "book-kept" (Bu et al. 2023): sum_i w_i g_i is formed
from the same stored a_i, gamma_i (e.g. A^T diag(w) Gamma for a Dense
kernel), so there is no second backward pass.

Capture, and why it is exact. The model is evaluated per example under
``jax.vmap`` (exactly as the reference evaluates it), inside
``flax.linen.intercept_methods``: each supported layer call records its input
and returns ``out + p`` where ``p`` is an all-zero "perturbation" passed in
as an argument. Adding zero changes nothing in the forward pass, and
d(sum_j loss_j)/d p_i = d loss_i / d out_i because out_i only reaches
loss_i (the examples are evaluated independently, by construction of the
vmap). So ONE ``jax.grad`` of the summed loss with respect to the
perturbations returns every layer's per-example output cotangent. It never
asks for a parameter gradient, so the expensive weight-gradient
convolutions of an ordinary backward pass are skipped; the per-layer
contractions above replace them.

Everything else falls back to the reference, leaf by leaf: a parameter
that does not belong to a supported layer call (a custom ``self.param``, a
layer inside a lifted transform such as ``nn.remat``/``nn.scan``, a layer
called through another method such as ``Embed.attend``, a Conv with feature
groups, ...) gets a per-example zero offset delta_i inside the same vmap,
and the gradient with respect to delta_i is its per-example gradient.

Privacy. ``norms()`` and ``weighted_sum()`` are computed from the SAME
captured per-example quantities (a_i, gamma_i, fallback gradients), each a
function of example i alone, so the weighted sum with w_i = min(1, C/n_i)
moves by at most C when one example is added or removed, whatever the
model. Exactness (that these quantities ARE the per-example gradient) needs
the model's parameters to be used only through the layer calls that were
seen; the tests hold it to the vmap reference for every supported layer.
Layers with batch statistics (``BatchNorm`` in training mode, a norm layer
with ``axis_name``) mix examples and are refused with an error naming the
layer.

``GhostContributions`` is a backend of ``privacy.mechanism`` (``norms`` and
``weighted_sum``), so it is released by the one mechanism like every other.

Example (inside ``jax.jit``)::

  contributions = ghost.capture(model, params, (x, y))
  noisy_mean, stats = mechanism.privatize(contributions, C, mask, key,
                                          noise_multiplier=sigma,
                                          normalizer=q * n)
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from flax.core import tracers
from flax.linen import linear as flax_linear

from adamix_jax.privacy import clipping
from adamix_jax.privacy import mechanism
from adamix_jax.privacy import per_example

PyTree = Any
Path = tuple[str, ...]
# Per-example loss on ONE example's logits: (logits, label) -> scalar.
LogitLoss = Callable[[jax.Array, jax.Array], jax.Array]

NORM_LAYERS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.InstanceNorm)
# Forms of a layer's norm (and of its book-kept sum).
GHOST, DIRECT, AUTO = "ghost", "direct", "auto"


def softmax_cross_entropy(logits: jax.Array, label: jax.Array) -> jax.Array:
  """The default per-example loss: cross-entropy with an integer label."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, label)


# --- discovery: which calls are captured, decided before the real pass -------


@dataclasses.dataclass(frozen=True)
class _Call:
  """One call of a supported layer type seen while tracing ONE example."""

  path: Path
  kind: str  # "dense" | "conv" | "embed" | "norm"
  module: nn.Module  # unbound clone (its hyperparameters; norms re-apply it)
  out_shape: tuple[int, ...]  # per example, with the inner batch axis of 1
  out_dtype: Any
  unsupported: Optional[str]  # why this call cannot be captured, or None


def _kind(module: nn.Module) -> Optional[str]:
  # Exact types: a subclass may override __call__ and compute anything.
  kind = {nn.Dense: "dense", nn.Conv: "conv", nn.Embed: "embed"}.get(
      type(module))
  if kind is None and type(module) in NORM_LAYERS:
    kind = "norm"
  return kind


def _param_names(kind: str, module: nn.Module) -> tuple[str, ...]:
  if kind == "embed":
    return ("embedding",)
  if kind == "norm":
    names = []
    if getattr(module, "use_scale", True):
      names.append("scale")
    if getattr(module, "use_bias", True) and not isinstance(module,
                                                             nn.RMSNorm):
      names.append("bias")
    return tuple(names)
  return ("kernel", "bias") if module.use_bias else ("kernel",)


def _unsupported_reason(kind: str, module: nn.Module, args,
                        kwargs) -> Optional[str]:
  if len(args) != 1 or any(v is not None for v in kwargs.values()):
    return "called with more than one input"
  if kind == "dense" and (module.dot_general is not None or
                          module.dot_general_cls is not None):
    return "custom dot_general"
  if kind == "conv":
    dilation = module.input_dilation
    if module.feature_group_count != 1:
      return "feature_group_count != 1"
    if module.mask is not None:
      return "masked kernel"
    if (module.conv_general_dilated is not None or
        module.conv_general_dilated_cls is not None):
      return "custom conv_general_dilated"
    if dilation is not None and any(
        d != 1 for d in np.atleast_1d(dilation)):
      return "input_dilation != 1"
  return None


def _check_batch_independent(module: nn.Module, args, kwargs) -> None:
  """Refuses layers whose output for one example depends on the others."""
  path = "/".join(module.path) or "<root>"
  if isinstance(module, nn.BatchNorm):
    use_running_average = kwargs.get(
        "use_running_average", args[1] if len(args) > 1 else None)
    if use_running_average is None:
      use_running_average = module.use_running_average
    if not use_running_average:
      raise ValueError(
          f"BatchNorm at '{path}' normalises with batch statistics, which mix "
          "examples: a per-example gradient (and so DP clipping) is not "
          "defined. Use GroupNorm or LayerNorm, or BatchNorm with "
          "use_running_average=True (frozen statistics).")
  if isinstance(module, NORM_LAYERS + (nn.BatchNorm,)) and getattr(
      module, "axis_name", None) is not None:
    raise ValueError(
        f"{type(module).__name__} at '{path}' reduces over the named axis "
        f"'{module.axis_name}', which mixes examples across devices; DP "
        "clipping needs per-example independence.")


def _discover(model: nn.Module, params: PyTree, example: tuple,
              loss: LogitLoss, apply_kwargs: dict,
              variables: dict) -> list[_Call]:
  """Traces the model on ONE example (shapes only) and lists its layer calls."""
  calls: list[_Call] = []
  flat_params = traverse_util.flatten_dict(params)

  def one_example(params, x, y):
    top_trace = tracers.current_trace()

    def interceptor(next_fun, args, kwargs, context):
      module = context.module
      if context.method_name == "__call__":
        _check_batch_independent(module, args, kwargs)
      kind = _kind(module)
      if kind is None or context.method_name == "setup":
        return next_fun(*args, **kwargs)
      reason = None
      if context.method_name != "__call__":
        reason = f"called through .{context.method_name}()"
      elif tracers.current_trace() != top_trace:
        reason = "inside a lifted transform (nn.remat/nn.scan/nn.vmap/...)"
      else:
        reason = _unsupported_reason(kind, module, args, kwargs)
      if reason is None:
        seen = jax.tree_util.tree_map(jnp.shape,
                                      module.variables.get("params", {}))
        for name in _param_names(kind, module):
          key = tuple(module.path) + (name,)
          if (key not in flat_params or name not in seen or
              jnp.shape(flat_params[key]) != seen[name]):
            reason = f"parameter '{name}' not found at its path"
      out = next_fun(*args, **kwargs)
      calls.append(_Call(
          path=tuple(module.path), kind=kind,
          module=module.clone(parent=None),
          out_shape=tuple(jnp.shape(out)), out_dtype=jnp.result_type(out),
          unsupported=reason))
      return out

    with nn.intercept_methods(interceptor):
      logits = model.apply({"params": params, **variables}, x[None],
                           **apply_kwargs)[0]
    return loss(logits, y)

  jax.eval_shape(one_example, params, *example)
  return calls


# --- per-layer contributions -------------------------------------------------


def _rows(keep: jax.Array, array: jax.Array) -> jax.Array:
  """``array`` with the rows (axis 0) where ``keep`` is False set to 0."""
  keep = jnp.reshape(keep, (-1,) + (1,) * (array.ndim - 1))
  return jnp.where(keep, array, jnp.zeros_like(array))


def _squares(g: jax.Array) -> jax.Array:
  g = jnp.reshape(g, (g.shape[0], -1)).astype(jnp.float32)
  return jnp.sum(g * g, axis=1)


def _sum_rows(weights: jax.Array, g: jax.Array) -> jax.Array:
  # One contraction over the batch axis (see clipping.clipped_sum for why).
  return jnp.tensordot(weights.astype(g.dtype), g, axes=1)


class _Layer:
  """One parameter-owning module: its per-example contribution."""

  path: Path
  leaf_names: tuple[str, ...]

  def sq_norms(self) -> jax.Array:
    raise NotImplementedError

  def weighted_sum(self, weights: jax.Array, keep: jax.Array) -> dict:
    """{leaf name: sum_i w_i g_i} over rows with ``keep``; others give 0."""
    raise NotImplementedError

  def project(self, basis: dict) -> jax.Array:
    """(B, k): <g_i, v_j> with ``basis[name]`` of shape leaf.shape + (k,)."""
    raise NotImplementedError


@dataclasses.dataclass
class _OuterProducts(_Layer):
  """kernel_i = sum_t u_it v_it^T (Dense, Conv), bias_i = sum_t v_it.

  ``u``: (B, T, K) inputs or unfolded patches; ``v``: (B, T, Cout) output
  cotangents; calls of a shared layer are concatenated along T.
  """

  path: Path
  kernel_shape: tuple[int, ...]
  has_bias: bool
  u: jax.Array
  v: jax.Array
  form: str

  @property
  def leaf_names(self):
    return ("kernel", "bias") if self.has_bias else ("kernel",)

  def _per_example_kernel(self) -> jax.Array:
    return jnp.einsum("btk,btc->bkc", self.u, self.v)

  def sq_norms(self):
    if self.form == DIRECT:
      kernel_sq = _squares(self._per_example_kernel())
    else:
      gram_u = jnp.einsum("btk,bsk->bts", self.u, self.u)
      gram_v = jnp.einsum("btc,bsc->bts", self.v, self.v)
      kernel_sq = jnp.sum((gram_u * gram_v).astype(jnp.float32), axis=(1, 2))
    if self.has_bias:
      kernel_sq = kernel_sq + _squares(jnp.sum(self.v, axis=1))
    return kernel_sq

  def weighted_sum(self, weights, keep):
    if self.form == DIRECT:
      kernel = _sum_rows(weights, _rows(keep, self._per_example_kernel()))
    else:
      u = _rows(keep, self.u)
      wv = _rows(keep, self.v) * weights[:, None, None].astype(self.v.dtype)
      kernel = jnp.einsum("btk,btc->kc", u, wv)
    out = {"kernel": jnp.reshape(kernel, self.kernel_shape)}
    if self.has_bias:
      out["bias"] = _sum_rows(weights, _rows(keep, jnp.sum(self.v, axis=1)))
    return out

  def project(self, basis):
    k = basis["kernel"].shape[-1]
    kernel_basis = jnp.reshape(basis["kernel"], (self.u.shape[-1],
                                                 self.v.shape[-1], k))
    if self.form == DIRECT:
      coeffs = jnp.einsum("bkc,kcj->bj", self._per_example_kernel(),
                          kernel_basis)
    elif self.u.shape[-1] >= self.v.shape[-1]:
      # Contract the larger side with the basis first: a (B T, K) x (K, C k)
      # product, then a cheap reduction against the cotangents.
      coeffs = jnp.einsum("btcj,btc->bj",
                          jnp.einsum("btk,kcj->btcj", self.u, kernel_basis),
                          self.v)
    else:
      coeffs = jnp.einsum("btkj,btk->bj",
                          jnp.einsum("btc,kcj->btkj", self.v, kernel_basis),
                          self.u)
    if self.has_bias:
      coeffs = coeffs + jnp.sum(self.v, axis=1) @ basis["bias"]
    return coeffs


@dataclasses.dataclass
class _Embedding(_Layer):
  """embedding_i = sum_t onehot(id_it) v_it^T; ids (B, T), v (B, T, F)."""

  path: Path
  table_shape: tuple[int, int]
  ids: jax.Array
  v: jax.Array
  form: str
  leaf_names: tuple[str, ...] = ("embedding",)

  def _per_example_table(self) -> jax.Array:
    onehot = jax.nn.one_hot(self.ids, self.table_shape[0], dtype=self.v.dtype)
    return jnp.einsum("btn,btf->bnf", onehot, self.v)

  def sq_norms(self):
    if self.form == DIRECT:
      return _squares(self._per_example_table())
    same = (self.ids[:, :, None] == self.ids[:, None, :]).astype(self.v.dtype)
    gram_v = jnp.einsum("btf,bsf->bts", self.v, self.v)
    return jnp.sum((same * gram_v).astype(jnp.float32), axis=(1, 2))

  def weighted_sum(self, weights, keep):
    wv = _rows(keep, self.v) * weights[:, None, None].astype(self.v.dtype)
    table = jnp.zeros(self.table_shape, self.v.dtype).at[
        jnp.reshape(self.ids, (-1,))].add(
            jnp.reshape(wv, (-1, self.table_shape[1])))
    return {"embedding": table}

  def project(self, basis):
    rows = jnp.take(basis["embedding"], self.ids, axis=0)  # (B, T, F, k)
    return jnp.einsum("btfj,btf->bj", rows, self.v)


@dataclasses.dataclass
class _Materialised(_Layer):
  """Per-example gradients held explicitly: {name: (B, *leaf_shape)}."""

  path: Path
  grads: dict

  @property
  def leaf_names(self):
    return tuple(self.grads)

  def sq_norms(self):
    return sum(_squares(g) for g in self.grads.values())

  def weighted_sum(self, weights, keep):
    return {name: _sum_rows(weights, _rows(keep, g))
            for name, g in self.grads.items()}

  def project(self, basis):
    return sum(jnp.reshape(g, (g.shape[0], -1)) @ jnp.reshape(
        basis[name], (-1, basis[name].shape[-1]))
               for name, g in self.grads.items())


# --- conv unfolding ----------------------------------------------------------


def _conv_geometry(module: nn.Conv, in_shape: Sequence[int]):
  """(kernel_size, strides, kernel_dilation, pre-pad, lax padding) of a Conv."""
  kernel_size = ((module.kernel_size,) if isinstance(module.kernel_size, int)
                 else tuple(module.kernel_size))
  nd = len(kernel_size)

  def broadcast(value):
    if value is None:
      value = 1
    return (value,) * nd if isinstance(value, int) else tuple(value)

  strides = broadcast(module.strides)
  dilation = broadcast(module.kernel_dilation)
  padding = flax_linear.canonicalize_padding(module.padding, nd)
  dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, dilation)]
  pre_pad = None  # (jnp.pad widths, mode) applied before a VALID conv
  if padding in ("CIRCULAR", "REFLECT"):
    pre_pad = ([((k - 1) // 2, k // 2) for k in dilated],
               {"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding])
    padding = "VALID"
  elif padding == "CAUSAL":
    pre_pad = ([(dilation[0] * (kernel_size[0] - 1), 0)], "constant")
    padding = "VALID"
  spatial = tuple(in_shape[-nd - 1:-1])
  if isinstance(padding, str):
    if pre_pad is not None:
      spatial = tuple(s + lo + hi for s, (lo, hi) in zip(spatial, pre_pad[0]))
    padding = jax.lax.padtype_to_pads(spatial, dilated, strides, padding)
  return kernel_size, strides, dilation, pre_pad, tuple(
      tuple(p) for p in padding)


def unfold_patches(x: jax.Array, module: nn.Conv,
                   out_spatial: Sequence[int]) -> jax.Array:
  """(N, *spatial, Cin) -> (N, T, prod(kernel) * Cin) patches of a flax Conv.

  Patch features are ordered (kernel offsets..., Cin), the row-major order
  of the kernel (*kernel_size, Cin, Cout), so patches @ kernel.reshape(-1,
  Cout) is the convolution. Strided slices, not
  ``lax.conv_general_dilated_patches`` (a convolution with a one-hot kernel:
  K times the flops).
  """
  kernel_size, strides, dilation, pre_pad, padding = _conv_geometry(
      module, x.shape)
  if pre_pad is not None:
    x = jnp.pad(x, [(0, 0)] + list(pre_pad[0]) + [(0, 0)], mode=pre_pad[1])
  x = jax.lax.pad(x, jnp.zeros((), x.dtype),
                  [(0, 0, 0)] + [(lo, hi, 0) for lo, hi in padding] +
                  [(0, 0, 0)])
  slices = []
  for offset in itertools.product(*(range(k) for k in kernel_size)):
    start = [0] + [o * d for o, d in zip(offset, dilation)] + [0]
    limit = ([x.shape[0]] +
             [s + (n - 1) * st + 1 for s, n, st in zip(start[1:], out_spatial,
                                                      strides)] +
             [x.shape[-1]])
    slices.append(jax.lax.slice(x, start, limit, [1] + list(strides) + [1]))
  patches = jnp.stack(slices, axis=-2)  # (N, *out, prod(kernel), Cin)
  return jnp.reshape(patches, (x.shape[0], -1, patches.shape[-2] *
                               patches.shape[-1]))


# --- the capture -------------------------------------------------------------


def _choose(form: str, ghost_cost: float, direct_cost: float) -> str:
  if form != AUTO:
    return form
  return DIRECT if direct_cost < ghost_cost else GHOST


def _build_layer(path: Path, kind: str, module: nn.Module, calls: list[_Call],
                 inputs: list[jax.Array], cotangents: list[jax.Array],
                 params: dict, form: str) -> _Layer:
  """One module's contribution from its calls' inputs and output cotangents.

  ``inputs[c]`` / ``cotangents[c]``: (B, *per-example shape) of call c.
  """
  batch = inputs[0].shape[0]
  if kind == "norm":
    unbound = module

    def one(p, x, g):
      _, pullback = jax.vjp(lambda p: unbound.apply({"params": p}, x), p)
      return pullback(g)[0]

    grads = None
    for x, g in zip(inputs, cotangents):
      part = jax.vmap(one, in_axes=(None, 0, 0))(params, x, g)
      grads = part if grads is None else jax.tree_util.tree_map(jnp.add,
                                                                grads, part)
    return _Materialised(path, dict(grads))
  if kind == "embed":
    table_shape = tuple(params["embedding"].shape)
    ids = jnp.concatenate([jnp.reshape(x, (batch, -1)) for x in inputs], 1)
    if table_shape[0] == 1:
      ids = jnp.zeros_like(ids)  # flax broadcasts the single row
    v = jnp.concatenate([jnp.reshape(g, (batch, -1, table_shape[1]))
                         for g in cotangents], 1)
    positions = ids.shape[1]
    chosen = _choose(form, positions**2 * table_shape[1],
                     positions * table_shape[0] * table_shape[1])
    return _Embedding(path, table_shape, ids, v, chosen)
  kernel_shape = tuple(params["kernel"].shape)
  out_features = kernel_shape[-1]
  us, vs = [], []
  for call, x, g in zip(calls, inputs, cotangents):
    if kind == "dense":
      us.append(jnp.reshape(x, (batch, -1, kernel_shape[0])))
    else:
      nd = len(kernel_shape) - 2
      flat_x = jnp.reshape(x, (-1,) + x.shape[-nd - 1:])
      out_spatial = call.out_shape[-nd - 1:-1]
      patches = unfold_patches(flat_x, module, out_spatial)
      us.append(jnp.reshape(patches, (batch, -1, patches.shape[-1])))
    vs.append(jnp.reshape(g, (batch, -1, out_features)))
  u = jnp.concatenate(us, 1) if len(us) > 1 else us[0]
  v = jnp.concatenate(vs, 1) if len(vs) > 1 else vs[0]
  positions, fan_in = u.shape[1], u.shape[2]
  chosen = _choose(form, positions**2 * (fan_in + out_features),
                   positions * fan_in * out_features)
  return _OuterProducts(path, kernel_shape, "bias" in params, u, v, chosen)


@dataclasses.dataclass(frozen=True)
class CaptureInfo:
  """What the capture did with each parameter-owning module (diagnostics).

  Attributes:
    captured: {module path: (kind, form, number of calls)}.
    fallback: {parameter path: why it is handled by per-example vmap}.
  """

  captured: dict
  fallback: dict


class GhostContributions:
  """Per-example gradient contributions from ONE forward+backward capture.

  Use it inside the jitted step that created it: it holds traced arrays.
  """

  def __init__(self, params: PyTree, layers: list[_Layer], fallback: dict,
               losses: jax.Array, info: CaptureInfo):
    self._params = params
    self._layers = layers
    self._fallback = fallback  # {leaf path: (B, *shape) per-example grads}
    self.losses = losses
    self.info = info
    self._norms = None

  @property
  def batch_size(self) -> int:
    return self.losses.shape[0]

  def squared_norms_by_layer(self) -> dict:
    """{module path (or fallback leaf path): (B,) squared norms}."""
    out = {layer.path: layer.sq_norms() for layer in self._layers}
    for path, g in self._fallback.items():
      out[path] = _squares(g)
    return out

  def norms(self) -> jax.Array:
    """(B,) L2 norm of each example's whole gradient (every parameter)."""
    if self._norms is None:
      total = jnp.zeros((self.batch_size,), jnp.float32)
      for sq in self.squared_norms_by_layer().values():
        total = total + sq
      self._norms = jnp.sqrt(total)
    return self._norms

  def weighted_sum(self, weights: jax.Array) -> PyTree:
    """sum_i w_i g_i, a pytree like params.

    Rows with weight 0 (padding, or clipped away) and rows whose norm is
    non-finite contribute exactly 0: their stored quantities are replaced
    by zeros before any product (NaN * 0 is NaN).
    """
    keep = (weights != 0) & jnp.isfinite(self.norms())
    weights = jnp.where(keep, weights, 0.0)
    flat = {}
    for layer in self._layers:
      for name, value in layer.weighted_sum(weights, keep).items():
        flat[layer.path + (name,)] = value
    for path, g in self._fallback.items():
      flat[path] = _sum_rows(weights, _rows(keep, g))
    return _like(self._params, flat)

  def project(self, basis: jax.Array | PyTree) -> jax.Array:
    """(B, k) coefficients <g_i, v_j> of each example on each basis vector.

    Args:
      basis: (P, k) with columns in ``ravel_pytree(params)`` order (as
        ``adamix.transform.gradient_basis`` returns), or a pytree like params
        whose leaves carry a leading axis k.
    """
    basis = basis_tree(self._params, basis)
    flat_basis = traverse_util.flatten_dict(basis)
    total = 0.0
    for layer in self._layers:
      total = total + layer.project(
          {name: flat_basis[layer.path + (name,)] for name in layer.leaf_names})
    for path, g in self._fallback.items():
      total = total + jnp.reshape(g, (g.shape[0], -1)) @ jnp.reshape(
          flat_basis[path], (-1, flat_basis[path].shape[-1]))
    return total


def _like(params: PyTree, flat: dict) -> PyTree:
  """A pytree with params' structure, leaf at path p taken from flat[p]."""
  def pick(key_path, leaf):
    path = tuple(k.key for k in key_path)
    return flat[path].astype(jnp.result_type(leaf))
  return jax.tree_util.tree_map_with_path(pick, params)


def basis_tree(params: PyTree, basis: jax.Array | PyTree) -> PyTree:
  """A basis as a pytree like params with a TRAILING axis k on every leaf.

  Args:
    params: the parameters (their ``ravel_pytree`` order and shapes).
    basis: (P, k), columns in ``ravel_pytree(params)`` order, or a stacked
      pytree like params whose leaves have a LEADING axis k (the form
      ``projection.stacked_basis`` returns).
  """
  if not isinstance(basis, (jax.Array, np.ndarray)):
    return jax.tree_util.tree_map(lambda v: jnp.moveaxis(v, 0, -1), basis)
  basis = jnp.asarray(basis)
  leaves, treedef = jax.tree_util.tree_flatten(params)
  if basis.shape[0] != sum(int(np.size(leaf)) for leaf in leaves):
    raise ValueError(f"basis has {basis.shape[0]} rows, params have "
                     f"{sum(int(np.size(leaf)) for leaf in leaves)} entries.")
  # ravel_pytree lays the leaves out one after the other, row-major: each
  # leaf's block of rows, reshaped, is its basis (no transpose, no copy).
  blocks, offset = [], 0
  for leaf in leaves:
    size = int(np.size(leaf))
    blocks.append(jnp.reshape(basis[offset:offset + size],
                              jnp.shape(leaf) + (basis.shape[1],)))
    offset += size
  return jax.tree_util.tree_unflatten(treedef, blocks)


def capture(model: nn.Module,
            params: PyTree,
            batch: tuple[jax.Array, jax.Array],
            loss: LogitLoss = softmax_cross_entropy,
            *,
            form: str = AUTO,
            apply_kwargs: Optional[dict] = None,
            variables: Optional[dict] = None) -> GhostContributions:
  """Runs ONE per-example forward + backward and keeps what clipping needs.

  Args:
    model: a Flax linen module; ``model.apply({"params": params}, x[None],
      **apply_kwargs)`` gives one example's logits (batch of 1), exactly as
      ``train.full_model.classification_loss`` evaluates it.
    params: its parameters (a nested dict).
    batch: (x, y), leading axis B (padded rows included).
    loss: per-example loss on (logits, label) -> scalar.
    form: "auto" picks, per layer, the cheaper of the ghost Gram form and the
      materialised per-example gradient; "ghost" / "direct" force one (tests).
    apply_kwargs: extra keyword arguments of ``model.apply``.
    variables: other, non-trainable collections passed to ``model.apply``
      with the params (e.g. ``{"batch_stats": ...}`` of a frozen BatchNorm).

  Returns:
    A ``GhostContributions``: ``norms()``, ``weighted_sum(w)``,
    ``project(basis)``, ``losses``, ``info``.

  Raises:
    ValueError: the model has a layer that mixes examples (BatchNorm in
      training mode, a norm layer over a named axis).
  """
  if form not in (AUTO, GHOST, DIRECT):
    raise ValueError(f"form must be 'auto', 'ghost' or 'direct', got {form!r}.")
  apply_kwargs = dict(apply_kwargs or {})
  variables = dict(variables or {})
  if "params" in variables:
    raise ValueError("Pass the parameters as `params`, not in `variables`.")
  x, y = batch
  size = x.shape[0]
  calls = _discover(model, params, (x[0], y[0]), loss, apply_kwargs,
                    variables)

  # A module is captured only if EVERY one of its calls can be.
  by_path: dict[Path, list[_Call]] = {}
  for call in calls:
    by_path.setdefault(call.path, []).append(call)
  captured = {path: group for path, group in by_path.items()
              if all(c.unsupported is None for c in group)}
  flat_params = traverse_util.flatten_dict(params)
  owned = {path + (name,) for path, group in captured.items()
           for name in _param_names(group[0].kind, group[0].module)}
  fallback_paths = [p for p in flat_params if p not in owned]
  reasons = {}
  for path in fallback_paths:
    group = by_path.get(path[:-1])
    reasons[path] = next((c.unsupported for c in group or [] if c.unsupported),
                         "not a parameter of a supported layer")
  order = [c for c in calls if c.path in captured]

  def one_example(perturbations, deltas, x, y):
    flat = dict(flat_params)
    for path, delta in zip(fallback_paths, deltas):
      flat[path] = flat[path] + delta
    example_params = traverse_util.unflatten_dict(flat)
    inputs = []

    def interceptor(next_fun, args, kwargs, context):
      module = context.module
      if (context.method_name != "__call__" or _kind(module) is None or
          tuple(module.path) not in captured):
        return next_fun(*args, **kwargs)
      index = len(inputs)
      if index >= len(order) or order[index].path != tuple(module.path):
        raise RuntimeError("The model called its layers in a different order "
                           "than when it was traced for ghost clipping.")
      inputs.append(args[0])
      return next_fun(*args, **kwargs) + perturbations[index]

    with nn.intercept_methods(interceptor):
      logits = model.apply({"params": example_params, **variables}, x[None],
                           **apply_kwargs)[0]
    if len(inputs) != len(order):
      raise RuntimeError(f"The model made {len(inputs)} captured layer calls, "
                         f"{len(order)} when it was traced for ghost "
                         "clipping.")
    return loss(logits, y), inputs

  def summed_loss(perturbations, deltas):
    losses, inputs = jax.vmap(one_example)(perturbations, deltas, x, y)
    return jnp.sum(losses), (losses, inputs)

  perturbations = [jnp.zeros((size,) + c.out_shape, c.out_dtype) for c in order]
  deltas = [jnp.zeros((size,) + jnp.shape(flat_params[p]),
                      jnp.result_type(flat_params[p])) for p in fallback_paths]
  (cotangents, delta_grads), (losses, inputs) = jax.grad(
      summed_loss, argnums=(0, 1), has_aux=True)(perturbations, deltas)

  layers = []
  info = {}
  for path, group in captured.items():
    index = [i for i, c in enumerate(order) if c.path == path]
    layer_params = {name: flat_params[path + (name,)]
                    for name in _param_names(group[0].kind, group[0].module)}
    layer = _build_layer(path, group[0].kind, group[0].module, group,
                         [inputs[i] for i in index],
                         [cotangents[i] for i in index], layer_params, form)
    layers.append(layer)
    info["/".join(path)] = (group[0].kind, getattr(layer, "form", DIRECT),
                            len(group))
  fallback = dict(zip(fallback_paths, delta_grads))
  return GhostContributions(
      params, layers, fallback, losses,
      CaptureInfo(captured=info,
                  fallback={"/".join(p): r for p, r in reasons.items()}))


# --- the DP building blocks --------------------------------------------------


def ghost_clipped_grad_sum(model: nn.Module,
                           params: PyTree,
                           batch: tuple[jax.Array, jax.Array],
                           clip_norm: jax.Array | float,
                           mask: Optional[jax.Array] = None,
                           *,
                           loss: LogitLoss = softmax_cross_entropy,
                           form: str = AUTO,
                           apply_kwargs: Optional[dict] = None,
                           variables: Optional[dict] = None
                           ) -> tuple[PyTree, clipping.ClipStats]:
  """sum_i min(1, C/||g_i||) g_i over real rows, and its ClipStats.

  Equals ``privacy.clipped_grad_sum(classification_loss(model), params,
  batch, clip_norm, mask)`` (L2 sensitivity C) without per-example
  gradients for the supported layers.
  """
  contributions = capture(model, params, batch, loss, form=form,
                          apply_kwargs=apply_kwargs, variables=variables)
  if mask is None:
    mask = jnp.ones((contributions.batch_size,), jnp.float32)
  return mechanism.clipped_sum(contributions, clip_norm, mask)


def projected_coefficients(model: nn.Module,
                           params: PyTree,
                           batch: tuple[jax.Array, jax.Array],
                           basis: jax.Array | PyTree,
                           loss: LogitLoss = softmax_cross_entropy,
                           *,
                           form: str = AUTO,
                           apply_kwargs: Optional[dict] = None,
                           variables: Optional[dict] = None,
                           examples_per_pass: Optional[int] = None
                           ) -> jax.Array:
  """(B, k): <g_i, v_j> from the capture, ``examples_per_pass`` examples at
  a time (the unfolded patches and cotangents held at once shrink by
  B / examples_per_pass; the coefficients are the same). Unclipped."""
  return per_example.map_example_slices(
      lambda part: capture(model, params, part, loss, form=form,
                           apply_kwargs=apply_kwargs,
                           variables=variables).project(basis),
      batch, examples_per_pass)


def ghost_clipped_projection_sum(model: nn.Module,
                                 params: PyTree,
                                 batch: tuple[jax.Array, jax.Array],
                                 basis: jax.Array | PyTree,
                                 clip_norm: jax.Array | float,
                                 mask: Optional[jax.Array] = None,
                                 *,
                                 loss: LogitLoss = softmax_cross_entropy,
                                 form: str = AUTO,
                                 apply_kwargs: Optional[dict] = None,
                                 variables: Optional[dict] = None,
                                 examples_per_pass: Optional[int] = None
                                 ) -> tuple[jax.Array, clipping.ClipStats]:
  """AdaMix: sum_i clip_C(V^T g_i), a k-vector, without per-example gradients.

  Equals the vmap backend projected onto ``basis`` (``adamix.transform.projector``): project THEN clip, so the projection cannot carry an example
  past the bound. ``examples_per_pass``: see ``projected_coefficients``.
  """
  coefficients = projected_coefficients(
      model, params, batch, basis, loss, form=form, apply_kwargs=apply_kwargs,
      variables=variables, examples_per_pass=examples_per_pass)
  return per_example.clipped_sum(coefficients, clip_norm, mask)

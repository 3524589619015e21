r"""Cross-level contrast and consistency (Zhao et al., ISBI 2022) as drop-in losses.

An image is cut into a ``gh × gw`` grid of patches; the network runs on the full image and,
separately, on every patch as an image of its own.

* **Contrast.** The full-image projection pooled onto the grid gives one *global* embedding
  :math:`q_{b,i}` per cell; each patch's projection pooled over the patch gives one *local*
  embedding :math:`k_{b,i}`. With rows L2-normalised and :math:`\tau = 0.07`,

  .. math::
      \ell_{b,i} = -\log \frac{e^{q_{b,i} \cdot k_{b,i} / \tau}}
                              {\sum_{j \in \mathcal{N}} e^{q_{b,i} \cdot k_{j} / \tau}}

  averaged over all cells, where :math:`\mathcal{N}` is the cells of image *b*
  (``negatives="image"``, the original) or of the whole batch (``negatives="batch"``). This is
  :func:`contrastkit.info_nce` with paired views (label = cell id), groups = image id and
  ``denominator="all"``.

* **Consistency.** The prediction for each patch run alone must match the full-image
  prediction over the same region:
  :math:`\operatorname{mean}\,(\sigma(z^{patch}) - \operatorname{sg}[\sigma(z^{full})])^2`.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import nn

from . import _validation as v
from ._loss_module import LossModule
from ._temperature import TemperatureModule
from ._validation import compute_dtype
from .core import info_nce
from .distributed import gather_keys, rank_offset
from .patches import as_grid, patchify, pool_patches

NEGATIVES = ("image", "batch")
ACTIVATIONS = ("sigmoid", "softmax", "multilabel")
REDUCTIONS = ("mean", "sum", "none")


def _check_float_tensor(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype; got {x.dtype}")


def _check_same_device_dtype(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}; use one device")
    if x.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but {ref_name} has {ref.dtype}; use one dtype")


def _cells(global_map: torch.Tensor, local_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both inputs as embeddings in :func:`patchify` order (image, then row-major cell) that
    :func:`~contrastkit.info_nce` takes without a copy: the global map as it is, the local one as
    a map of the same shape or as (B·gh·gw, C) rows."""
    _check_float_tensor("global_map", global_map)
    _check_float_tensor("local_map", local_map)
    if global_map.dim() != 4:
        raise ValueError(f"global_map must be (B, C, gh, gw); got shape {tuple(global_map.shape)}")
    b, c, gh, gw = global_map.shape
    if b == 0 or c == 0 or gh == 0 or gw == 0:
        raise ValueError(f"global_map must not be empty; got shape {tuple(global_map.shape)}")
    _check_same_device_dtype("local_map", local_map, "global_map", global_map)
    if local_map.shape == global_map.shape:
        return global_map, local_map
    cells = b * gh * gw
    if local_map.shape == (cells, c, 1, 1) or local_map.shape == (cells, c):
        # The per-patch projections pooled to 1x1, as pool_patches(proj, 1) returns them.
        return global_map, local_map.reshape(cells, c)
    raise ValueError(
        f"local_map must match global_map's batch, channels and grid: expected (B, C, gh, gw) = "
        f"{tuple(global_map.shape)} or (B·gh·gw, C) = ({cells}, {c}); got shape {tuple(local_map.shape)}"
    )


@v.settings_check
def _check_contrast_settings(negatives, detach_local, symmetric, normalize, gather_distributed, reduction,
                             backend) -> None:
    """The settings checks of :func:`cross_level_contrast`, which :class:`CrossLevelContrast` runs at construction."""
    v.check_choice("negatives", negatives, NEGATIVES)
    v.check_choice("reduction", reduction, v.REDUCTIONS)
    v.check_choice("backend", backend, v.BACKENDS)
    for name, flag in (("detach_local", detach_local), ("symmetric", symmetric), ("normalize", normalize),
                       ("gather_distributed", gather_distributed)):
        v.check_flag(name, flag)


def cross_level_contrast(
    global_map: torch.Tensor,
    local_map: torch.Tensor,
    *,
    temperature: float | torch.Tensor = 0.07,
    negatives: str = "image",
    detach_local: bool = True,
    symmetric: bool = False,
    normalize: bool = True,
    gather_distributed: bool = False,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    r"""Cross-level (global cell vs. local patch) PatchNCE loss; see :class:`CrossLevelContrast`
    for the inputs and the formula.

    Args:
        temperature: τ; the original uses 0.07. A number or a 0-dim tensor (the module also
            learns it with ``learnable_temperature=True``, log-parametrised).
        negatives: ``"image"`` — the other cells of the same image (the original);
            ``"batch"`` — the other cells of every image in the batch.
        detach_local: no gradient reaches ``local_map`` (the original detaches the keys).
        symmetric: also contrast local queries against global keys and average both
            directions. With ``detach_local`` the local side still receives no gradient; the
            second direction then trains the global side through its keys.
        normalize: L2-normalise rows first, so that the dot product is a cosine. The original
            code normalised with the **L1** norm; this is a deliberate deviation.
        gather_distributed: with ``negatives="batch"`` under DDP, the keys of every rank are
            negatives (:func:`contrastkit.gather_keys`); each rank returns the mean over its own
            cells. With ``negatives="image"`` all negatives are local and nothing is gathered.
        reduction: ``"mean"`` over the cells, ``"sum"``, or ``"none"``: each cell's loss, (B, gh, gw).
        backend: the :func:`~contrastkit.info_nce` backend.
    """
    _check_contrast_settings(negatives, detach_local, symmetric, normalize, gather_distributed, reduction, backend)
    global_cells, local_cells = _cells(v.plain(global_map), v.plain(local_map))
    if detach_local:
        local_cells = local_cells.detach()
    options = dict(temperature=temperature, normalize=normalize, denominator="all", reduction=reduction,
                   backend=backend)
    if gather_distributed and negatives == "batch":
        # The cells of every rank are negatives: cell ids must be unique across ranks.
        n = global_map.shape[0] * global_map.shape[2] * global_map.shape[3]
        first_cell = rank_offset(n, global_map.device)
        cell_ids = torch.arange(first_cell, first_cell + n, device=global_map.device)

        def direction(queries, keys):
            all_keys, all_cell_ids, _ = gather_keys(v.as_rows(keys), cell_ids)
            return info_nce(queries, all_keys, labels=cell_ids, key_labels=all_cell_ids, **options)
    else:
        # Paired views (labels=None): key i, the own patch, is the only positive of query i.
        # Per-image negatives are the B images as equal blocks (groups=B): small calls are one
        # batched product. With negatives="image" every negative is local, so gathering would
        # change nothing.
        groups = global_map.shape[0] if negatives == "image" else None

        def direction(queries, keys):
            return info_nce(queries, keys, groups=groups, **options)

    with v.embedding_names("global_map", "local_map"):
        loss = direction(global_cells, local_cells)
    if symmetric:
        # Local cells as queries against the global cells as keys. detach_local keeps its
        # meaning — no gradient reaches local_map — so here the gradient flows through the keys.
        with v.embedding_names("local_map", "global_map"):
            loss = 0.5 * (loss + direction(local_cells, global_cells))
    return loss.reshape(global_map.shape[0], *global_map.shape[2:]) if reduction == "none" else loss


class CrossLevelContrast(LossModule, TemperatureModule):
    r"""Contrast between the global (full-image) and local (per-patch) embeddings of each cell.

    Settings (keyword-only): those of :func:`cross_level_contrast`, and
    ``learnable_temperature`` — learn τ as exp(``log_temperature``), a parameter of the module.

    ``forward(global_map, local_map)``:

    * ``global_map`` — (B, C, gh, gw): the full-image projection pooled onto the grid,
      e.g. ``pool_patches(proj_full, grid)``.
    * ``local_map`` — (B, C, gh, gw), or (B·gh·gw, C) / (B·gh·gw, C, 1, 1) in
      :func:`~contrastkit.patchify` order: each patch's projection pooled over the patch,
      e.g. ``pool_patches(proj_patches, 1)``.

    Returns the mean over all B·gh·gw cells of

    .. math::
        \ell_{b,i} = -\log \frac{e^{q_{b,i} \cdot k_{b,i} / \tau}}
                                {\sum_{j \in \mathcal{N}_{b}} e^{q_{b,i} \cdot k_{j} / \tau}}

    which is the cross-entropy with target 0 over :math:`[q_i k_i, q_i k_j \;(j \ne i)] / \tau`
    (PatchNCE). A 1×1 grid with ``negatives="image"`` has no negatives: every cell's only
    candidate is its positive and the loss is exactly 0 (still attached to the graph).
    """

    function = staticmethod(cross_level_contrast)
    check_settings = staticmethod(_check_contrast_settings)


def _consistency_grid(patch_logits: torch.Tensor, full_logits: torch.Tensor, grid) -> tuple[int, int]:
    _check_float_tensor("patch_logits", patch_logits)
    _check_float_tensor("full_logits", full_logits)
    _check_same_device_dtype("patch_logits", patch_logits, "full_logits", full_logits)
    for name, x, shape in (("patch_logits", patch_logits, "(B·gh·gw, K, ph, pw)"),
                           ("full_logits", full_logits, "(B, K, H, W)")):
        if x.dim() != 4:
            raise ValueError(f"{name} must be {shape}; got shape {tuple(x.shape)}")
        if 0 in x.shape:
            raise ValueError(f"{name} must not be empty; got shape {tuple(x.shape)}")
    n, k, ph, pw = patch_logits.shape
    b, k_full, h, w = full_logits.shape
    if k != k_full:
        raise ValueError(f"patch_logits has {k} classes but full_logits has {k_full}; they must match")
    if h % ph or w % pw:
        raise ValueError(
            f"the patch size (ph, pw) = ({ph}, {pw}) of patch_logits must divide the size "
            f"(H, W) = ({h}, {w}) of full_logits"
        )
    inferred = (h // ph, w // pw)
    if grid is not None and as_grid(grid) != inferred:
        raise ValueError(
            f"grid {as_grid(grid)} does not match the sizes: full_logits (H, W) = ({h}, {w}) and "
            f"patches ({ph}, {pw}) make a {inferred[0]}x{inferred[1]} grid"
        )
    if n != b * inferred[0] * inferred[1]:
        raise ValueError(
            f"patch_logits holds {n} patches but full_logits's batch of {b} on a "
            f"{inferred[0]}x{inferred[1]} grid needs B·gh·gw = {b * inferred[0] * inferred[1]}"
        )
    return inferred


def _check_activation(activation: str, channels: int) -> None:
    # Both mismatches run without error and train the wrong thing: sigmoid on softmax logits makes
    # each class channel its own binary problem, and the softmax of one channel is 1 everywhere
    # (the loss is 0 whatever the model predicts).
    if activation == "sigmoid" and channels > 1:
        raise ValueError(
            f"activation='sigmoid' takes 1-channel (binary) logits; got {channels} channels. For "
            f"multi-class logits pass activation='softmax'; for {channels} independent (multi-label) "
            "channels pass activation='multilabel'")
    if activation == "softmax" and channels == 1:
        raise ValueError("activation='softmax' needs K >= 2 channels (over one channel it is 1 everywhere "
                         "and the loss is 0); for 1-channel binary logits pass activation='sigmoid'")


@v.settings_check
def _check_consistency_settings(activation, detach_full, reduction) -> None:
    """The settings checks of :func:`cross_level_consistency`, which :class:`CrossLevelConsistency` runs at
    construction."""
    v.check_choice("activation", activation, ACTIVATIONS)
    v.check_choice("reduction", reduction, REDUCTIONS)
    v.check_flag("detach_full", detach_full)


def cross_level_consistency(
    patch_logits: torch.Tensor,
    full_logits: torch.Tensor,
    *,
    activation: str = "sigmoid",
    detach_full: bool = True,
    reduction: str = "mean",
    grid=None,
) -> torch.Tensor:
    r"""Patch-vs-full prediction consistency; see :class:`CrossLevelConsistency` for the inputs and
    the formula.

    Args:
        activation: ``"sigmoid"`` (1-channel binary logits, the original), ``"softmax"``
            (multi-class, K >= 2, over dim 1) or ``"multilabel"`` (a sigmoid on each of K
            independent channels). Logits that do not match — several channels with
            ``"sigmoid"``, one with ``"softmax"`` — are a ValueError naming the fitting choice.
        detach_full: no gradient reaches ``full_logits`` (the original detaches it).
        reduction: ``"mean"`` over every element, ``"sum"``, or ``"none"`` — the
            (B·gh·gw, K, ph, pw) squared differences.
        grid: ``(gh, gw)``, checked against the sizes when given (it follows from them).
    """
    _check_consistency_settings(activation, detach_full, reduction)
    patch_logits, full_logits = v.plain(patch_logits), v.plain(full_logits)
    grid = _consistency_grid(patch_logits, full_logits, grid)
    _check_activation(activation, patch_logits.shape[1])
    if v.value_checks_enabled(patch_logits.device):
        v.raise_first_failure([v.finite_check(("patch_logits", patch_logits), ("full_logits", full_logits))])
    dtype = compute_dtype(patch_logits.dtype)
    full_region = patchify(full_logits, grid).to(dtype)
    if detach_full:
        full_region = full_region.detach()
    patch_logits = patch_logits.to(dtype)
    if activation != "softmax":
        diff = torch.sigmoid(patch_logits) - torch.sigmoid(full_region)
    else:
        diff = torch.softmax(patch_logits, dim=1) - torch.softmax(full_region, dim=1)
    squared = diff.square()
    if reduction == "none":
        return squared
    return squared.sum() if reduction == "sum" else squared.mean()


class CrossLevelConsistency(LossModule):
    r"""Each patch's own prediction must match the full-image prediction over its region.

    Settings (keyword-only): those of :func:`cross_level_consistency`.

    ``forward(patch_logits, full_logits, grid=None)``: ``patch_logits`` is
    (B·gh·gw, K, ph, pw) in :func:`~contrastkit.patchify` order, ``full_logits`` is
    (B, K, H, W). The grid ``(H/ph, W/pw)`` follows from the sizes; pass ``grid`` to have it
    checked as well.

    .. math::
        L = \frac{1}{B \, g_h g_w K p_h p_w} \sum
            \big(\sigma(z^{patch}) - \operatorname{sg}[\sigma(\mathrm{patchify}(z^{full}))]\big)^2

    The original code averages over (B, K, ph, pw) for each cell and **sums** over the
    cells, so its value is this mean times ``gh·gw``; scale the loss weight accordingly.
    """

    function = staticmethod(cross_level_consistency)
    check_settings = staticmethod(_check_consistency_settings)
    per_call = ("grid",)


class CrossLevelViews(NamedTuple):
    """What one cross-level step needs, from one pass on the images and one on their patches."""

    full_logits: torch.Tensor  # (B, K, H, W)
    patch_logits: torch.Tensor  # (B·gh·gw, K, H/gh, W/gw)
    global_map: torch.Tensor  # (B, C, gh, gw): full-image projection pooled onto the grid
    local_map: torch.Tensor  # (B·gh·gw, C): each patch's projection pooled over the patch
    # (B, C, H, W): the full-image projection itself, for a pixel-level loss in the same step
    # (e.g. PseudoLabelContrast on the labeled images) without a third forward pass
    full_projection: torch.Tensor | None = None


def _logits_and_projection(out, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(out, dict):
        if "logits" in out and "projection" in out:
            return out["logits"], out["projection"]
    elif hasattr(out, "logits") and hasattr(out, "projection"):
        return out.logits, out.projection
    raise TypeError(
        f"model(x, return_features=True) on the {what} must return an object with .logits and "
        f".projection (or a dict with those keys), like contrastkit.models.UNet; got {type(out).__name__}"
    )


PATCH_BATCHNORM = ("batch", "batch_no_update", "running")


@contextmanager
def batchnorm_mode(model: nn.Module, mode: str):
    """How the model's BatchNorm layers treat a pass over patches (see :func:`cross_level_views`)."""
    v.check_choice("patch_batchnorm", mode, PATCH_BATCHNORM)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] \
        if isinstance(model, nn.Module) else []
    saved = [(m, m.training, m.momentum) for m in norms]
    try:
        for m in norms:
            if mode == "running":
                m.eval()  # normalise with the running (full-image) statistics; gradients still flow
            elif mode == "batch_no_update" and m.training:
                m.momentum = 0.0  # running <- (1 - 0) running + 0 batch: left as the full images made it
        yield
    finally:
        for m, training, momentum in saved:
            m.train(training)
            m.momentum = momentum


def cross_level_views(
    model: nn.Module, images: torch.Tensor, grid, patch_batchnorm: str = "batch_no_update"
) -> CrossLevelViews:
    """Run ``model`` on the full images and, as a separate batch, on their patches.

    ``model(x, return_features=True)`` must return logits and a dense projection map
    (as :class:`contrastkit.models.UNet` does). Both the full images and the patches must
    be sizes the model accepts (for a U-Net of depth d: multiples of 2^d).

    ``patch_batchnorm`` says what BatchNorm layers do in the patch pass of a model in training
    mode (the full-image pass is always an ordinary training pass):

    - ``"batch"`` (the original code): patches are normalised with the patch batch's statistics,
      which also enter the running statistics — so the running statistics used at test time mix
      full images and patches (on Kvasir-SEG this shifts a trained model's test predictions:
      see examples/README.md);
    - ``"batch_no_update"`` (the default): patches normalised with their own batch statistics, running
      statistics left to the full images, which are what a test-time pass sees. On the Kvasir-SEG
      validation split this cut the over-segmentation of ``"batch"`` (precision 0.35 -> 0.44, recall
      0.82 -> 0.62 late in training, Dice unchanged within noise; docs/cross_level.md);
    - ``"running"``: patches normalised with the running statistics of the full images, as a
      test-time pass would be (the affine parameters still train).
    """
    grid = as_grid(grid)
    patches = patchify(images, grid)
    full_logits, full_proj = _logits_and_projection(model(images, return_features=True), "full images")
    with batchnorm_mode(model, patch_batchnorm):
        patch_logits, patch_proj = _logits_and_projection(model(patches, return_features=True), "patches")
    return CrossLevelViews(
        full_logits=full_logits,
        patch_logits=patch_logits,
        global_map=pool_patches(full_proj, grid),
        local_map=pool_patches(patch_proj, 1).flatten(1),
        full_projection=full_proj,
    )

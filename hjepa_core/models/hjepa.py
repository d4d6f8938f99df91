"""H-JEPA: hierarchical I-JEPA with multi-crop (Assran et al., 2023; Caron et al., 2021).

One forward pass over a :class:`~hjepa_core.data.MultiCropBatch`:

1. The EMA target encoder embeds the full global crops; targets are layer-normed tokens,
   average-pooled over 2^k x 2^k windows (and layer-normed again) for level k. The top of the
   hierarchy is the *image level*: a global crop's layer-normed mean target token, which the
   predictor also predicts from each global context, for every global view of the image.
2. The context encoder embeds the global crops' context patches (all global crops in one
   call) and the local crops that take part (all local crops in one call).
3. The predictor sees the global context (plus context-role local tokens under
   ``global_with_local_context`` / ``cross_crop_prediction``) and predicts, in one sequence,
   every level's target blocks (and, under ``cross_crop_prediction``, the target-role local
   crops' target features) at their source-frame positions.
4. Local -> image level, in every strategy: from a local crop's tokens alone the predictor
   predicts each global crop's image-level target, queried at that crop's source-frame box.
   A small crop must predict what the whole view means: DINO's local-to-global
   correspondence (Caron et al., 2021) as a JEPA prediction in latent space, not a dense
   regression of features the local crop itself shows.
"""

from __future__ import annotations

import copy
import functools
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hjepa_core.data.multicrop_dataset import MultiCropBatch
from hjepa_core.losses import prediction_loss, sigreg_loss, vicreg_loss
from hjepa_core.masks.multicrop_masking import LOCAL_CONTEXT, LOCAL_TARGET, LOCAL_UNMASKED
from hjepa_core.models.predictor import HierarchicalPredictor, source_positions
from hjepa_core.models.vit import VisionTransformer, build_encoder


@dataclass
class HJEPAOutput:
    """Loss, its parts (detached floats for logging) and pooled target embeddings."""

    loss: Tensor
    parts: dict[str, Tensor]
    pooled_targets: Tensor


@functools.cache
def _native_bf16(device_type: str) -> bool:
    """Whether the device multiplies bf16 natively: CUDA with bf16, a CPU with AMX or AVX512-BF16
    (elsewhere bf16 GEMMs are emulated and slower than fp32)."""
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device_type == "cpu" and (torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def _layer_norm(x: Tensor) -> Tensor:
    return F.layer_norm(x, x.shape[-1:])


def _gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    return torch.gather(x, 1, index[..., None].expand(-1, -1, x.shape[-1]))


def _rows(x: Tensor, rows: list[int]) -> Tensor:
    """``x[rows]`` for a Python list of rows, without an index tensor (no host-to-device copy)."""
    return torch.stack([x[i] for i in rows])


def _key_valid(context: Tensor, queries: list[tuple[Tensor, int]], valid: list[Tensor | None]) -> Tensor | None:
    """The predictor's (N, Tc + sum Tq) attention key mask: False at target-block padding; None
    when no query group is padded."""
    if all(v is None for v in valid):
        return None

    def everything(x: Tensor) -> Tensor:
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)

    return torch.cat([everything(context),
                      *(everything(q) if v is None else v for (q, _), v in zip(queries, valid, strict=True))], dim=1)


def _per_image(tokens: Tensor, crops: int, batch: int, repeat: int) -> Tensor:
    """(crops*B, T, D) crop-major -> (repeat*B, crops*T, D): an image's crops in one row."""
    t, d = tokens.shape[1:]
    rows = tokens.view(crops, batch, t, d).transpose(0, 1).reshape(batch, crops * t, d)
    return rows.repeat(repeat, 1, 1)


class HJEPA(nn.Module):
    """Context encoder, EMA target encoder and hierarchical predictor with the H-JEPA loss.

    Args:
        encoder: the context encoder; the target encoder starts as its copy.
        predictor: a :class:`HierarchicalPredictor` with one head per level.
        hierarchy_weights: loss weight of each level.
        loss_type: ``smooth_l1`` or ``mse``.
        local_weight: weight of the local-crop terms (local -> image level; cross-crop prediction).
        local_level_weight: weight of each local crop predicting a global crop's masked target
            blocks at every level from the local crop alone (0 turns it off).
        image_weight: weight of the image-level prediction from the global crops' contexts (each
            context predicts every global view's image-level target: cross-view when n_g >= 2).
        vicreg_weight: weight of VICReg on pooled context embeddings of two global views.
        sigreg_weight: weight of SIGReg (LeJEPA) on the pooled context embeddings of every
            global crop: an anti-collapse term that needs no second view.
        target_precision: the target encoder's no-grad pass: ``bf16`` (pure bf16, see
            :meth:`encode_targets`), ``fp32``, or ``auto``: bf16 where the device has native bf16.
    """

    def __init__(
        self,
        encoder: VisionTransformer,
        predictor: HierarchicalPredictor,
        hierarchy_weights: list[float],
        loss_type: str = "smooth_l1",
        local_weight: float = 1.0,
        local_level_weight: float = 0.0,
        image_weight: float = 1.0,
        vicreg_weight: float = 0.0,
        sigreg_weight: float = 0.0,
        target_precision: str = "auto",
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.target_encoder = copy.deepcopy(encoder)
        self.target_encoder.requires_grad_(False)
        self.predictor = predictor
        self.hierarchy_weights = list(hierarchy_weights)
        self.loss_type = loss_type
        self.local_weight = local_weight
        self.local_level_weight = local_level_weight
        self.image_weight = image_weight
        self.vicreg_weight = vicreg_weight
        self.sigreg_weight = sigreg_weight
        self.target_precision = target_precision

    def train(self, mode: bool = True) -> HJEPA:
        super().train(mode)
        self.target_encoder.eval()
        return self

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        """EMA step: target <- momentum * target + (1 - momentum) * online."""
        online: list[Tensor] = list(self.encoder.parameters())
        target: list[Tensor] = list(self.target_encoder.parameters())
        torch._foreach_lerp_(target, online, 1.0 - momentum)

    def target_dtype(self, device_type: str) -> torch.dtype:
        """The dtype of the target encoder's pass on ``device_type`` under ``target_precision``."""
        bf16 = self.target_precision == "bf16" or (self.target_precision == "auto" and _native_bf16(device_type))
        return torch.bfloat16 if bf16 else torch.float32

    @torch.no_grad()
    def encode_targets(self, images: Tensor) -> Tensor:
        """The target encoder's fp32 tokens; a pure bf16 pass where ``target_precision`` picks bf16.

        The EMA weights stay fp32 (an EMA step moves a weight by ~0.4% of its gap to the online
        weight, often below bf16's resolution) and are cast for each pass. A pure pass, unlike
        autocast, keeps the in-place no-grad blocks and casts nothing per op: the target encoder
        ran 2.3x faster on a 2-core AMX CPU (``benchmarks/README.md``, "Training step").
        """
        dtype = self.target_dtype(images.device.type)
        if dtype == torch.float32:
            return self.target_encoder(images)
        weights = {name: t.to(dtype) if t.is_floating_point() else t
                   for name, t in (*self.target_encoder.named_parameters(), *self.target_encoder.named_buffers())}
        with torch.autocast(images.device.type, enabled=False):
            tokens = torch.func.functional_call(self.target_encoder, weights, (images.to(dtype),))
        return tokens.float()

    @torch.no_grad()
    def _targets(self, images: Tensor, levels: int) -> tuple[Tensor, list[Tensor]]:
        tokens = _layer_norm(self.encode_targets(images))
        n, t, d = tokens.shape
        side = round(t**0.5)
        grid = tokens.transpose(1, 2).reshape(n, d, side, side)
        pooled = [tokens]
        for k in range(1, levels):
            coarse = F.avg_pool2d(grid, kernel_size=2**k, stride=2**k)
            pooled.append(_layer_norm(coarse.flatten(2).transpose(1, 2)))
        return tokens, pooled

    def forward(self, batch: MultiCropBatch) -> HJEPAOutput:
        masks = batch.masks
        if masks is None:
            raise ValueError("the batch has no masks; build the loader with a mask_generator")
        n_g, b = batch.num_global_crops, batch.batch_size
        levels = len(masks.global_masks[0].targets)
        grids = masks.global_masks[0].grid_sizes
        side = grids[0]
        images = torch.cat(batch.crops[:n_g])
        boxes, flips = batch.boxes[:n_g].flatten(0, 1), batch.flips[:n_g].flatten(0, 1)

        target_tokens, level_targets = self._targets(images, levels)
        context_idx = torch.cat([m.context for m in masks.global_masks])
        context = self.encoder(images, context_idx)
        global_positions = source_positions(boxes, flips, side)
        pred_context = [context]
        pred_positions = [_gather_tokens(global_positions, context_idx)]

        local_crops = batch.crops[n_g:]
        local_boxes, local_flips = batch.boxes[n_g:], batch.flips[n_g:]
        encoded_roles = [i for i, r in enumerate(masks.local_roles) if r in (LOCAL_CONTEXT, LOCAL_UNMASKED)]
        local_tokens = local_positions = None
        if encoded_roles:
            local_tokens = self.encoder(torch.cat([local_crops[i] for i in encoded_roles]), masks.local_keep)
            local_positions = source_positions(
                _rows(local_boxes, encoded_roles).flatten(0, 1), _rows(local_flips, encoded_roles).flatten(0, 1),
                masks.local_grid,
            )
            if masks.local_keep is not None:
                local_positions = _gather_tokens(local_positions, masks.local_keep)
            context_roles = [j for j, i in enumerate(encoded_roles) if masks.local_roles[i] == LOCAL_CONTEXT]
            if context_roles:
                tokens = torch.cat([local_tokens[j * b:(j + 1) * b] for j in context_roles])
                positions = torch.cat([local_positions[j * b:(j + 1) * b] for j in context_roles])
                pred_context.append(_per_image(tokens, len(context_roles), b, n_g))
                pred_positions.append(_per_image(positions, len(context_roles), b, n_g))

        # Under torch.compile target blocks have a fixed cell count per level, padded where a batch's
        # blocks are smaller: the padding is hidden from attention and the loss.
        queries, answers, valid = [], [], []
        for k, weight in enumerate(self.hierarchy_weights):
            idx = torch.cat([m.targets[k] for m in masks.global_masks]).flatten(1)
            crop_valid = [m.target_valid[k] for m in masks.global_masks if m.target_valid is not None]
            level_valid = torch.cat(crop_valid).flatten(1) if len(crop_valid) == len(masks.global_masks) else None
            level_positions = source_positions(boxes, flips, side, cell=2**k)
            queries.append((_gather_tokens(level_positions, idx), k))
            answers.append((f"loss/level_{k}", weight, _gather_tokens(level_targets[k], idx)))
            valid.append(level_valid)
        target_roles = [i for i, r in enumerate(masks.local_roles) if r == LOCAL_TARGET]
        if target_roles:
            target_images = torch.cat([local_crops[i] for i in target_roles])
            local_targets = _layer_norm(self.encode_targets(target_images))
            positions = source_positions(
                _rows(local_boxes, target_roles).flatten(0, 1), _rows(local_flips, target_roles).flatten(0, 1),
                masks.local_grid,
            )
            queries.append((_per_image(positions, len(target_roles), b, n_g), 0))
            answers.append(("loss/cross_crop", self.local_weight,
                            _per_image(local_targets, len(target_roles), b, n_g)))
            valid.append(None)
        image_targets, image_queries = self._image_level(target_tokens, boxes, flips, n_g, b)
        if self.image_weight > 0:
            queries.append((image_queries.repeat(n_g, 1, 1), self.image_level))
            answers.append(("loss/image", self.image_weight, image_targets.repeat(n_g, 1, 1)))
            valid.append(None)

        pred_context_tokens = torch.cat(pred_context, 1)
        predictions = self.predictor(pred_context_tokens, torch.cat(pred_positions, 1), queries,
                                     _key_valid(pred_context_tokens, queries, valid))
        parts: dict[str, Tensor] = {}
        total = images.new_zeros((), dtype=torch.float32)
        for pred, (name, weight, target), mask in zip(predictions, answers, valid, strict=True):
            parts[name] = prediction_loss(pred, target, self.loss_type, mask)
            total = total + weight * parts[name]

        if local_tokens is not None and local_positions is not None:
            total = total + self._local_loss(local_tokens, local_positions, queries[:levels], answers[:levels],
                                             valid[:levels], image_queries, image_targets, n_g, b, parts)
        pooled_context = context.float().mean(dim=1) if self.vicreg_weight > 0 or self.sigreg_weight > 0 else None
        if pooled_context is not None and self.vicreg_weight > 0 and n_g >= 2:
            parts["loss/vicreg"] = vicreg_loss(pooled_context[:b], pooled_context[b:2 * b])
            total = total + self.vicreg_weight * parts["loss/vicreg"]
        if pooled_context is not None and self.sigreg_weight > 0:
            parts["loss/sigreg"] = sigreg_loss(pooled_context)
            total = total + self.sigreg_weight * parts["loss/sigreg"]
        parts = {name: value.detach() for name, value in parts.items()}
        pooled_targets = target_tokens.float().mean(dim=1)
        return HJEPAOutput(total, parts, pooled_targets)

    def _local_loss(self, tokens: Tensor, positions: Tensor, level_queries: list[tuple[Tensor, int]],
                    level_answers: list[tuple[str, float, Tensor]], level_valid: list[Tensor | None],
                    image_queries: Tensor, image_targets: Tensor, n_g: int, b: int,
                    parts: dict[str, Tensor]) -> Tensor:
        """The encoded local crops, each alone as context, predict their image's image-level targets
        (``loss/local``) and, with ``local_level_weight > 0``, the masked target blocks of global crop
        ``j % n_g`` at every level (``loss/local_levels``): a masked prediction task across views and
        scales that reuses the global crop's target features, so its only cost is the local crop's
        own encoding (the multi-crop idea of Caron et al. 2020, in JEPA form)."""
        repeat = tokens.shape[0] // b
        queries = [(image_queries.repeat(repeat, 1, 1), self.image_level)]
        targets = [image_targets.repeat(repeat, 1, 1)]
        masks: list[Tensor | None] = [None]
        if self.local_level_weight > 0:
            def global_rows(x: Tensor) -> Tensor:  # rows of global crop j % n_g for local crop j
                return torch.cat([x[j % n_g * b:(j % n_g + 1) * b] for j in range(repeat)])

            queries += [(global_rows(level_positions), k) for level_positions, k in level_queries]
            targets += [global_rows(level_targets) for _, _, level_targets in level_answers]
            masks += [None if v is None else global_rows(v) for v in level_valid]
        predictions = self.predictor(tokens, positions, queries, _key_valid(tokens, queries, masks))
        parts["loss/local"] = prediction_loss(predictions[0], targets[0], self.loss_type)
        total = self.local_weight * parts["loss/local"]
        if self.local_level_weight > 0:
            weights = [weight for _, weight, _ in level_answers]
            level_losses = [w * prediction_loss(p, t, self.loss_type, m)
                            for w, p, t, m in zip(weights, predictions[1:], targets[1:], masks[1:], strict=True)]
            parts["loss/local_levels"] = functools.reduce(operator.add, level_losses) / sum(weights)
            total = total + self.local_level_weight * parts["loss/local_levels"]
        return total

    @staticmethod
    def _image_level(target_tokens: Tensor, boxes: Tensor, flips: Tensor, n_g: int, b: int) -> tuple[Tensor, Tensor]:
        """Image-level targets and their queries, per image: (B, n_g, D) layer-normed mean target
        tokens of its global crops, and (B, n_g, 4) each crop's whole box in the source frame."""
        targets = _layer_norm(target_tokens.float().mean(dim=1)).view(n_g, b, -1).transpose(0, 1)
        whole_crop = source_positions(boxes, flips, side=1)  # (n_g*B, 1, 4)
        return targets, whole_crop.view(n_g, b, 4).transpose(0, 1)

    @property
    def image_level(self) -> int:
        """The predictor head and query embedding of the image level (after the spatial levels)."""
        return len(self.hierarchy_weights)


def build_hjepa(config) -> HJEPA:
    """The H-JEPA model a :class:`~hjepa_core.config.Config` describes."""
    m = config.model
    encoder = build_encoder(m)
    predictor = HierarchicalPredictor(
        encoder_dim=encoder.embed_dim,
        embed_dim=m.predictor_embed_dim,
        depth=m.predictor_depth,
        num_heads=m.predictor_num_heads,
        num_levels=config.masking.num_hierarchies + 1,  # spatial levels + the image level
        mlp_ratio=m.mlp_ratio,
        pos_scale=float(config.crops.global_crop_size // m.patch_size),
        grad_checkpointing=m.grad_checkpointing,
    )
    return HJEPA(
        encoder,
        predictor,
        hierarchy_weights=config.loss.hierarchy_weights,
        loss_type=config.loss.type,
        local_weight=config.loss.local_weight,
        local_level_weight=config.loss.local_level_weight,
        image_weight=config.loss.image_weight,
        vicreg_weight=config.loss.vicreg_weight,
        sigreg_weight=config.loss.sigreg_weight,
        target_precision=config.training.target_precision,
    )

"""The distillation objective: affinity mimicking + ground-truth CLIP contrastive + feature distillation.

    loss_fn = DistillationLoss(affinity_weight=1.0, clip_weight=0.0, fixed_logit_scale=50.0)
    terms = loss_fn(student_out, teacher_out)      # {"loss", "affinity"}; teacher None = plain CLIP

Both inputs are open_clip output dicts: `image_features`, `text_features` (L2-normalised, row i of
the images pairs with row i of the texts) and `logit_scale` (exponentiated). Everything is computed
in fp32 whatever the models ran in.

Distributed convention (local loss, gather with gradient): each rank scores ITS rows against the
columns of ALL ranks (features gathered with `gather_with_grad`) and returns the mean over its
rows. The full-batch loss is the mean of the per-rank losses, so when the engine AVERAGES gradients
over ranks (DeepSpeed and DDP do) the result is exactly the single-process full-batch gradient; no
extra scaling. All ranks must pass the same number of rows.

Teacher dict: one teacher's outputs, or {"ensemble": [one dict per teacher]} (stored embeddings of
several teachers, training/teachers.py): the affinity targets are then the members' softmax
probabilities, each at its own logit scale, averaged.

Rows may come from anywhere: the teacher dict can hold precomputed embeddings read from shards,
and the student's rows can be the concatenation of this rank's micro-batches with all but one
detached (OpenCLIP-style feature caching for gradient accumulation). The loss assumes nothing about
where rows came from; each backward then yields the full-batch gradient through the rows that carry
a graph, and summing the micro-steps' backwards gives the full-batch gradient (an engine that
divides by gradient_accumulation_steps, as DeepSpeed does, needs the loss multiplied by it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.config import LossConfig
from training.distributed import gather_with_grad, rank_and_world
from training.objectives.base import TermInputs
from training.objectives.fusion import FusedFeature



def soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum_j p_j log softmax(logits)_j (= KL(p || q) + H(p))."""
    return -(target_probs * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


def contrastive_targets(local_ids: torch.Tensor, global_ids: torch.Tensor) -> torch.Tensor:
    """Target distribution of each local row over the global columns: uniform over the columns
    with the same id. With ids = row positions this is one-hot (one positive per row); giving
    several captions of one image the same id makes it the multi-positive target."""
    positives = (local_ids[:, None] == global_ids[None, :]).float()
    return positives / positives.sum(dim=1, keepdim=True)


def local_and_global_ids(num_local: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Global row positions of this rank's rows and of all rows (rank-order concatenation)."""
    rank, world = rank_and_world()
    global_ids = torch.arange(num_local * world, device=device)
    return global_ids[rank * num_local:(rank + 1) * num_local], global_ids


def symmetric_logits(image_local, text_local, image_all, text_all, scale):
    """(image -> text, text -> image) logits: local rows x global columns, times `scale`."""
    return scale * image_local @ text_all.T, scale * text_local @ image_all.T


class DistillationLoss(nn.Module):
    """affinity_weight * affinity + clip_weight * clip + feature_weight * feature.

    affinity: TinyCLIP's affinity mimicking: soft-target cross-entropy of the student's
        image->text and text->image logits against softmax of the teacher's, averaged.
    clip: the ground-truth contrastive loss (OpenCLIP's ClipLoss), on the student alone.
    feature: MSE or cosine distance between student and teacher embeddings, per row. When the
        widths differ, the task's FeatureProjection head (training/task.py) adds
        `image_features_projected` / `text_features_projected` to the student's outputs, and this
        term uses those. The loss itself has no parameters.
    fused_feature: the fusion head's `fused_image_features` vs the teacher's image features
        (training/objectives/fusion.py), with `fusion_weight`.
    fixed_logit_scale: e.g. 50.0 (TinyCLIP's recipes) for student and teacher in every term;
        None uses the student's learned scale and the teacher's own.
    TinyCLIP's alpha maps to affinity_weight=alpha, clip_weight=1-alpha.
    The settings' rules are LossConfig.validate's (training/config.py), checked here too.
    """

    def __init__(self, affinity_weight: float = 1.0, clip_weight: float = 0.0,
                 feature_weight: float = 0.0, feature_kind: str = "mse",
                 fixed_logit_scale: float | None = None, fusion_weight: float = 0.0):
        super().__init__()
        self.cfg = LossConfig(affinity_weight=affinity_weight, clip_weight=clip_weight,
                              feature_weight=feature_weight, feature_kind=feature_kind,
                              fixed_logit_scale=fixed_logit_scale, fusion_weight=fusion_weight)
        self.cfg.validate()
        self.affinity_weight = affinity_weight
        self.clip_weight = clip_weight
        self.feature_weight = feature_weight
        self.feature_kind = feature_kind
        self.fixed_logit_scale = fixed_logit_scale
        self.fusion_weight = fusion_weight
        self.fused_feature = FusedFeature()

    @classmethod
    def from_config(cls, cfg: LossConfig) -> "DistillationLoss":
        return cls(affinity_weight=cfg.affinity_weight, clip_weight=cfg.clip_weight,
                   feature_weight=cfg.feature_weight, feature_kind=cfg.feature_kind,
                   fixed_logit_scale=cfg.fixed_logit_scale, fusion_weight=cfg.fusion_weight)

    @property
    def needs_teacher(self) -> bool:
        return self.cfg.needs_teacher

    def forward(self, student: dict, teacher: dict | None = None) -> dict[str, torch.Tensor]:
        """{"loss": weighted total (with graph)} + each active term unweighted and detached."""
        if teacher is None and self.needs_teacher:
            raise ValueError("loss: affinity_weight or feature_weight > 0 needs teacher outputs")
        s_img, s_txt = (student[k].float() for k in ("image_features", "text_features"))
        terms: dict[str, torch.Tensor] = {}
        if self.affinity_weight > 0 or self.clip_weight > 0:
            s_logits = symmetric_logits(s_img, s_txt, gather_with_grad(s_img), gather_with_grad(s_txt),
                                        self._scale(student["logit_scale"]))
        if self.affinity_weight > 0:
            terms["affinity"] = sum(soft_cross_entropy(s, p)
                                    for s, p in zip(s_logits, self._teacher_probs(teacher))) / 2
        if self.clip_weight > 0:
            targets = contrastive_targets(*local_and_global_ids(s_img.shape[0], s_img.device))
            terms["clip"] = sum(soft_cross_entropy(s, targets) for s in s_logits) / 2
        if self.feature_weight > 0:
            if "ensemble" in teacher:
                raise ValueError("loss feature term: needs one teacher, got an ensemble")
            terms["feature"] = sum(
                self._feature_distance(student.get(f"{kind}_projected", student[kind]).float(),
                                       teacher[kind]) for kind in ("image_features", "text_features")) / 2
        if self.fusion_weight > 0:  # the fusion head's output (training/fusion.py)
            ids = local_and_global_ids(s_img.shape[0], s_img.device)
            terms["fused_feature"] = self.fused_feature(TermInputs(student, teacher, *ids))
        weights = {"affinity": self.affinity_weight, "clip": self.clip_weight,
                   "feature": self.feature_weight, "fused_feature": self.fusion_weight}
        total = sum(weights[name] * value for name, value in terms.items())
        return {"loss": total, **{name: value.detach() for name, value in terms.items()}}

    @torch.no_grad()
    def scales_used(self, student: dict, teacher: dict | None) -> dict[str, torch.Tensor]:
        """The logit scales the terms applied (the fixed one, else each model's own), to log."""
        scales = {"logit_scale": self._scale(student["logit_scale"]).detach().reshape(())}
        if teacher is None:
            return scales
        members = teacher.get("ensemble")
        if members is None:
            scales["teacher_logit_scale"] = torch.as_tensor(self._teacher_scale(teacher)).float()
        for t, member in enumerate(members or ()):
            scales[f"teacher_logit_scale.{t}"] = torch.as_tensor(self._teacher_scale(member)).float()
        return scales

    def _teacher_probs(self, teacher: dict) -> list[torch.Tensor]:
        """The affinity targets (image -> text, text -> image): softmax of the teacher's logits;
        for an ensemble ({"ensemble": [teacher dicts]}) each member's softmax at its own logit
        scale, averaged after the softmax (MobileCLIP's reinforced-data recipe)."""
        members = teacher.get("ensemble", [teacher])
        probs = [0.0, 0.0]
        for member in members:
            t_img, t_txt = (member[k].float().detach() for k in ("image_features", "text_features"))
            logits = symmetric_logits(t_img, t_txt, gather_with_grad(t_img), gather_with_grad(t_txt),
                                      self._teacher_scale(member))
            probs = [p + l.softmax(dim=-1) for p, l in zip(probs, logits)]
        return [p / len(members) for p in probs]

    def _scale(self, logit_scale: torch.Tensor) -> torch.Tensor:
        """The (exponentiated) scale a term uses. A fixed scale still touches the learned one with
        weight 0, so the student's logit_scale gets a (zero) gradient every step, as DDP and
        DeepSpeed expect of every trainable parameter."""
        logit_scale = logit_scale.float().reshape(())
        if self.fixed_logit_scale is None:
            return logit_scale
        return self.fixed_logit_scale + 0.0 * logit_scale

    def _teacher_scale(self, teacher: dict) -> torch.Tensor | float:
        """The fixed scale, else the teacher's own (precomputed teacher outputs may omit it when
        the scale is fixed)."""
        if self.fixed_logit_scale is not None:
            return self.fixed_logit_scale
        if teacher.get("logit_scale") is None:
            raise ValueError("loss: teacher outputs lack logit_scale and fixed_logit_scale is None")
        return teacher["logit_scale"].float().reshape(()).detach()

    def _feature_distance(self, student_features: torch.Tensor, teacher_features: torch.Tensor
                          ) -> torch.Tensor:
        teacher_features = teacher_features.float().detach()
        if student_features.shape != teacher_features.shape:
            raise ValueError(f"loss feature term: student features {tuple(student_features.shape)} vs "
                             f"teacher {tuple(teacher_features.shape)}; a FeatureProjection head "
                             f"(training/task.py) maps the student to the teacher's width")
        if self.feature_kind == "mse":
            return F.mse_loss(student_features, teacher_features)
        return (1 - F.cosine_similarity(student_features, teacher_features, dim=-1)).mean()

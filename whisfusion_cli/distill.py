"""Distillation from Whisper's own decoder: soft targets for the diffusion decoder's masked positions.

The default model's decoder starts as Whisper tiny.en's decoder with the causal mask removed; fine-tuned on
a few hours of speech it forgets what tiny.en knew about English (common words come out wrong). The
teacher is that same pre-trained decoder, kept causal and frozen, run teacher-forced on each training item
with the item's own encoder states: its distribution for the token at position p (read from its output at
p - 1, the autoregressive convention) becomes a KL term beside the masked-token cross-entropy.

Only positions the teacher can speak for get the term: the transcript's tokens and its end-of-text, not
the prefix (fixed, never masked) and not the padding after the end (the teacher never learnt to continue
past end-of-text).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .model import DecoderBase, key_mask


class Teacher:
    """A frozen, causal Whisper decoder (the WhisperDiffusionDecoder class holding the pre-trained weights,
    run with a causal self-attention mask) over the student's vocabulary: text tokens and end-of-text."""

    def __init__(self, decoder: DecoderBase, eos_id: int, n_prefix: int):
        self.decoder = decoder.eval().requires_grad_(False)
        self.eos_id, self.n_prefix = eos_id, n_prefix

    def loss(self, student_logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, condition: torch.Tensor,
             frames: torch.Tensor) -> torch.Tensor:
        """Summed KL(teacher || student) over the masked positions the teacher speaks for; student_logits [N, V]
        are the rows of `mask` (bool [B, T]) in row-major order, as `forward(positions=mask)` returns them."""
        taught = self.positions(target) & mask
        teacher = self.log_probs(target, condition, frames, taught)
        return distillation_loss(student_logits[taught[mask]], teacher)

    def positions(self, target: torch.Tensor) -> torch.Tensor:
        """bool [B, T]: positions with a teacher distribution (after the prefix, up to the first end-of-text)."""
        T = target.size(1)
        index = torch.arange(T, device=target.device)
        is_end = target == self.eos_id
        first_end = torch.where(is_end.any(1), is_end.float().argmax(1), torch.full_like(target[:, 0], T - 1))
        return (index >= self.n_prefix) & (index <= first_end[:, None])

    @torch.no_grad()
    def log_probs(self, target: torch.Tensor, condition: torch.Tensor, frames: torch.Tensor,
                  positions: torch.Tensor) -> torch.Tensor:
        """Teacher log-probabilities [N, n_logits] of the tokens at `positions` (bool [B, T], row-major order,
        as the student's `forward(positions=)`), teacher-forced on `target` [B, T]."""
        d = self.decoder
        T = target.size(1)
        kv = d.precompute_cross_kv(condition)
        cross_mask = key_mask(frames, kv[0][0].size(2))
        causal = torch.ones(T, T, dtype=torch.bool, device=target.device).tril()[None, None]
        hidden = d._trunk(target, kv, causal, cross_mask)
        # The output at p - 1 predicts the token at p.
        before = torch.zeros_like(positions)
        before[:, :-1] = positions[:, 1:]
        return F.log_softmax(d.project(hidden[before]).float(), dim=-1)


def distillation_loss(student_logits: torch.Tensor, teacher_log_probs: torch.Tensor) -> torch.Tensor:
    """Summed KL(teacher || student) over rows: [N, V] logits and [N, V] log-probabilities -> scalar."""
    student = F.log_softmax(student_logits.float(), dim=-1)
    return F.kl_div(student, teacher_log_probs, log_target=True, reduction="sum")

"""CLIP score with open_clip: ``max(100 * cos(image, text), 0)`` per image, averaged over images.

The scorer accepts every model open_clip can build:
- ``"miniature"``: the miniature world's CLIP shipped with accel (the default here);
- ``"MODEL:PRETRAINED"``: an open_clip architecture and a pretrained tag or checkpoint file, e.g.
  ``"ViT-g-14:laion2b_s34b_b88k"`` (what DeepCache reports) or ``"ViT-B-32:/ckpts/clip.pt"``;
- ``"local-dir:/path"`` or ``"hf-hub:org/repo"``: open_clip's own schemas.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from accel.errors import InputError


@dataclass(frozen=True)
class ClipSpec:
    name: str          # what open_clip is asked for
    pretrained: str | None
    label: str         # what reports print ("backbone:tag")


def resolve_clip(spec: str = "miniature") -> ClipSpec:
    if spec == "miniature":
        from accel import miniature

        return ClipSpec(miniature.CLIP_NAME, None, "miniature-clip:accel")
    if spec.startswith(("local-dir:", "hf-hub:")):
        return ClipSpec(spec, None, spec)
    if ":" in spec:
        model, tag = spec.split(":", 1)
        return ClipSpec(model, tag, spec)
    raise InputError(f"CLIP model {spec!r}: use 'miniature', 'MODEL:PRETRAINED' (e.g. ViT-g-14:laion2b_s34b_b88k), "
                     "'local-dir:/path' or 'hf-hub:org/repo'")


class CLIPScorer:
    """Embeds images and texts with an open_clip model and scores them.

    >>> scorer = CLIPScorer("miniature")
    >>> scorer.score(images, prompts)      # (N,) tensor of max(100 cos, 0)
    """

    def __init__(self, spec: str = "miniature", device: str = "cpu", batch_size: int = 64):
        import open_clip

        self.spec = resolve_clip(spec)
        self.device, self.batch_size = device, batch_size
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            self.spec.name, pretrained=self.spec.pretrained, device=device)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(self.spec.name)

    @torch.no_grad()
    def embed_images(self, images) -> torch.Tensor:
        """``images``: PIL images (list) -> ``(N, D)`` unit vectors."""
        out = []
        for i in range(0, len(images), self.batch_size):
            x = torch.stack([self.preprocess(im) for im in images[i:i + self.batch_size]]).to(self.device)
            out.append(torch.nn.functional.normalize(self.model.encode_image(x).float(), dim=-1))
        return torch.cat(out) if out else torch.empty(0)

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), self.batch_size):
            t = self.tokenizer(texts[i:i + self.batch_size]).to(self.device)
            out.append(torch.nn.functional.normalize(self.model.encode_text(t).float(), dim=-1))
        return torch.cat(out) if out else torch.empty(0)

    def score(self, images, prompts: list[str]) -> torch.Tensor:
        """Per-image CLIP score ``max(100 * cos, 0)`` of image i against prompt i: ``(N,)`` float tensor."""
        if len(images) != len(prompts):
            raise InputError(f"{len(images)} images but {len(prompts)} prompts")
        cos = (self.embed_images(images) * self.embed_texts(prompts)).sum(-1)
        return (100 * cos).clamp(min=0).cpu()

    def pick(self, images, candidates: list[list[str]]) -> list[int]:
        """Zero-shot choice: for image i, the index of the best-matching text in ``candidates[i]``."""
        img = self.embed_images(images)
        return [int((self.embed_texts(c) @ img[i]).argmax()) for i, c in enumerate(candidates)]

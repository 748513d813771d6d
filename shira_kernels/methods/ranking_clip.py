"""Ranking-aware adapter for CLIP: order a list of images by the quantity a text instruction
names ("how many dots"), after Yu et al., 2024 ("Learning Text-to-Image Ranking with CLIP",
the ranking-aware adapter). Written from the method's description, not from its code.

Why: CLIP scores how well an image matches a caption, not how much of something it shows; the
method teaches a frozen CLIP to rank with few trained parameters. The pieces, as built here:

- The base: a transformers ``CLIPModel``, frozen entirely. Every ``nn.Linear`` inside its text
  and vision encoders (attention q/k/v/out and MLP fc1/fc2) becomes one of this package's
  adapters: ``ShiraLinear`` (adapter="shira": sparse trainable entries over the frozen weight)
  or ``BinaryLoRALinear`` (adapter="binary": a 1-bit LoRA branch). The base weights are the
  same Parameters and are never written (tests/test_ranking_clip.py checks them bit for bit).
- Learnable prompt: ``n_prompt`` embeddings inserted after the start token of the instruction,
  so the text feature of "how many dots" is learnt for ranking, not only for matching. The
  text encoder runs on embeddings (transformers' CLIPTextModel takes only token ids), with
  CLIP's causal mask and pooling at the end-of-text token: with ``n_prompt=0`` it reproduces
  ``CLIPModel.get_text_features`` (tested).
- Text-conditioned image features: each image's projected CLIP feature, layer-normed, is
  modulated by the instruction's feature (FiLM: h = LN(f)·(1 + γ(t)) + β(t)).
- Regression head: an MLP maps h to a score per image; ``score(images, text)`` returns it, so
  ranking a list at inference needs no pairwise work and a single image gets a score too.
- Auxiliary branch (training signal): for a list of n images, the differences u_i − u_j of
  projected conditioned features; ranking-aware attention lets image i attend, with a query
  made of its own feature and the instruction, over its n − 1 differences (keys and values are
  functions of the differences) and reads out a relative score. Its ranking loss (weight
  ``aux_weight``) sends gradients about *which comparisons matter* through the shared adapters,
  prompt and conditioning. ``forward`` returns both score sets.
- Loss: RankNet (pairwise logistic over every pair with different targets) or ListMLE
  (Plackett-Luce likelihood of the target order), on both branches.

``kendall_tau`` (tau-b, ties handled as scipy's default) measures rankings without scipy.
Shapes: images [n, C, H, W] (one list) or [B, n, C, H, W]; scores [n] or [B, n]. One
instruction per call (token ids [L] or [1, L], or a string with ``tokenizer``), shared by the
lists of the batch. transformers is imported only when a model is wrapped.
"""
from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..masks import check_seed
from ..nn import BinaryLoRALinear, ShiraLinear, replace_linear

ADAPTERS = ("shira", "binary")
LOSSES = ("ranknet", "listmle")


class RankingOutput(NamedTuple):
    """Per-image scores of the regression head and relative scores of the auxiliary branch."""
    scores: torch.Tensor
    relative_scores: torch.Tensor


class HashTokenizer:
    """A word-level tokenizer for toy models that have no vocabulary file: each lower-cased
    word maps to crc32(word) mod (vocab_size − 2); the last two ids are start and end of text
    (``bos_token_id``, ``eos_token_id``). Give a CLIPConfig the same two ids."""

    def __init__(self, vocab_size: int):
        if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 3:
            raise ValueError(f"vocab_size must be an int >= 3, got {vocab_size!r}")
        self.vocab_size = vocab_size
        self.bos_token_id, self.eos_token_id = vocab_size - 2, vocab_size - 1

    def __call__(self, text: str) -> torch.Tensor:
        if not isinstance(text, str) or not text.split():
            raise ValueError(f"text must be a non-empty string, got {text!r}")
        words = [zlib.crc32(word.encode()) % (self.vocab_size - 2) for word in text.lower().split()]
        return torch.tensor([self.bos_token_id, *words, self.eos_token_id])


def _check_positive_int(value, name: str, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_targets(scores: torch.Tensor, targets: torch.Tensor) -> None:
    if not isinstance(scores, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise TypeError("scores and targets must be tensors")
    if scores.dim() not in (1, 2) or scores.shape != targets.shape:
        raise ValueError(f"scores and targets must have the same shape [n] or [B, n], got "
                         f"{tuple(scores.shape)} and {tuple(targets.shape)}")
    if scores.shape[-1] < 2:
        raise ValueError(f"a ranking needs at least 2 items per list, got {scores.shape[-1]}")
    if not torch.isfinite(targets).all():
        raise ValueError("targets must be finite")


def ranknet_loss(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over every pair (i, j) with targets[i] > targets[j] of log(1 + exp(s_j − s_i)).
    Ties give no pair; a batch with no pair at all is refused (the mean would be empty)."""
    _check_targets(scores, targets)
    s, y = scores.reshape(-1, scores.shape[-1]), targets.reshape(-1, targets.shape[-1])
    above = y.unsqueeze(-1) > y.unsqueeze(-2)  # [B, i, j]: i should rank above j
    if not above.any():
        raise ValueError("targets are all tied: no pair to rank")
    margins = s.unsqueeze(-1) - s.unsqueeze(-2)
    return F.softplus(-margins[above]).mean()


def listmle_loss(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean per list of −log P(target order) under Plackett-Luce with the scores as
    log-weights (ties in targets broken by position, stably)."""
    _check_targets(scores, targets)
    s, y = scores.reshape(-1, scores.shape[-1]), targets.reshape(-1, targets.shape[-1])
    order = torch.sort(y, dim=-1, descending=True, stable=True).indices
    ordered = s.gather(-1, order)
    # log Σ_{k ≥ position} exp(s_k): a reversed cumulative logsumexp.
    tails = torch.logcumsumexp(ordered.flip(-1), dim=-1).flip(-1)
    return (tails - ordered).sum(-1).mean()


_LOSS_FUNCTIONS = {"ranknet": ranknet_loss, "listmle": listmle_loss}


def _tau_b_one(x: list[float], y: list[float]) -> float:
    """Kendall's tau-b of two equal-length lists in O(n log n) (Knight's method: sort by (x, y),
    count the inversions of y by merge sort; ties counted per group)."""
    n = len(x)
    pairs = sorted(zip(x, y))
    total = n * (n - 1) // 2

    def tied_pairs(keys) -> int:
        count, run = 0, 1
        for a, b in zip(keys, keys[1:]):
            if a == b:
                run += 1
            else:
                count, run = count + run * (run - 1) // 2, 1
        return count + run * (run - 1) // 2

    ties_x = tied_pairs([p[0] for p in pairs])
    ties_xy = tied_pairs(pairs)
    ys = [p[1] for p in pairs]
    swaps = 0
    width = 1
    buffer = ys[:]
    while width < n:  # bottom-up merge sort of ys, counting inversions (strictly greater)
        for lo in range(0, n, 2 * width):
            mid, hi = min(lo + width, n), min(lo + 2 * width, n)
            i, j, k = lo, mid, lo
            while i < mid and j < hi:
                if ys[j] < ys[i]:
                    buffer[k] = ys[j]
                    swaps += mid - i
                    j += 1
                else:
                    buffer[k] = ys[i]
                    i += 1
                k += 1
            buffer[k:hi] = ys[i:mid] if i < mid else ys[j:hi]
        ys, buffer = buffer, ys
        width *= 2
    ties_y = tied_pairs(ys)
    # Pairs tied in x but not y were ordered by y in the sort: no inversion among them.
    concordant_minus_discordant = total - ties_x - ties_y + ties_xy - 2 * swaps
    denominator = math.sqrt((total - ties_x) * (total - ties_y))
    return concordant_minus_discordant / denominator if denominator > 0 else math.nan


def kendall_tau(x, y) -> torch.Tensor:
    """Kendall's tau-b between x and y: 1-D (one ranking; a 0-d tensor) or 2-D [B, n] (row by
    row; a [B] tensor). Equals (concordant − discordant)/(n(n−1)/2) without ties; nan where one
    side is constant (as scipy.stats.kendalltau). fp64 result."""
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    if x.shape != y.shape or x.dim() not in (1, 2):
        raise ValueError(f"x and y must have the same shape [n] or [B, n], got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")
    if x.shape[-1] < 2:
        raise ValueError(f"kendall_tau needs at least 2 items, got {x.shape[-1]}")
    x64, y64 = x.detach().double().cpu(), y.detach().double().cpu()
    if not (torch.isfinite(x64).all() and torch.isfinite(y64).all()):
        raise ValueError("x and y must be finite")
    rows = [_tau_b_one(a.tolist(), b.tolist()) for a, b in zip(x64.reshape(-1, x.shape[-1]),
                                                             y64.reshape(-1, y.shape[-1]))]
    result = torch.tensor(rows, dtype=torch.float64)
    return result.reshape(x.shape[:-1])


class RankingAwareAttention(nn.Module):
    """Image i attends over its differences to the other images of its list. u: [B, n, d]
    text-conditioned features, text: [B, d] or [1, d]. Returns relative scores [B, n]."""

    def __init__(self, dim: int):
        super().__init__()
        self.query = nn.Linear(dim, dim)
        self.query_text = nn.Linear(dim, dim, bias=False)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Sequential(nn.Linear(dim, dim), nn.GELU())
        self.readout = nn.Linear(dim, 1)

    def forward(self, u: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        n = u.shape[1]
        differences = u.unsqueeze(2) - u.unsqueeze(1)  # [B, i, j, d]: u_i − u_j
        query = self.query(u) + self.query_text(text).unsqueeze(1)  # [B, n, d]
        keys = self.key(differences)
        logits = torch.einsum("bid,bijd->bij", query, keys) / math.sqrt(u.shape[-1])
        self_pairs = torch.eye(n, dtype=torch.bool, device=u.device)
        weights = logits.masked_fill(self_pairs, float("-inf")).softmax(-1)
        attended = torch.einsum("bij,bijd->bid", weights, self.value(differences))
        return self.readout(attended).squeeze(-1)


class RankingCLIPAdapter(nn.Module):
    """A frozen CLIPModel with encoder adapters, a learnable instruction prompt, a text-
    conditioned regression head and an auxiliary ranking-aware attention branch.

    The CLIPModel is adapted in place (its encoders' nn.Linear layers are replaced; all its
    parameters are frozen); every argument is checked before it is touched.
    """

    def __init__(self, clip: nn.Module, *, adapter: str = "shira", r: int = 4,
                 n_prompt: int = 4, head_hidden: int = 128, aux_weight: float = 0.5,
                 loss: str = "ranknet", scale: float = 1.0, seed: int = 0,
                 tokenizer: Callable[[str], Sequence[int] | torch.Tensor] | None = None):
        super().__init__()
        try:
            from transformers import CLIPModel
        except ImportError as error:  # pragma: no cover - transformers is in the test extra
            raise ImportError("RankingCLIPAdapter needs transformers (pip install transformers)"
                              ) from error
        if not isinstance(clip, CLIPModel):
            raise TypeError(f"clip must be a transformers CLIPModel, got {type(clip).__name__}")
        if adapter not in ADAPTERS:
            raise ValueError(f"adapter must be one of {ADAPTERS}, got {adapter!r}")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        r = _check_positive_int(r, "r")
        n_prompt = _check_positive_int(n_prompt, "n_prompt", minimum=0)
        head_hidden = _check_positive_int(head_hidden, "head_hidden")
        if (not isinstance(aux_weight, (int, float)) or isinstance(aux_weight, bool)
                or not math.isfinite(aux_weight) or aux_weight < 0):
            raise ValueError(f"aux_weight must be a finite number >= 0, got {aux_weight!r}")
        if (not isinstance(scale, (int, float)) or isinstance(scale, bool)
                or not math.isfinite(scale)):
            raise ValueError(f"scale must be a finite number, got {scale!r}")
        seed = check_seed(seed)  # before the CLIP is frozen (replace_linear checks seed + i)
        if tokenizer is not None and not callable(tokenizer):
            raise TypeError(f"tokenizer must be callable, got {type(tokenizer).__name__}")
        if any(isinstance(m, (ShiraLinear, BinaryLoRALinear)) for m in clip.modules()):
            raise ValueError("clip already holds adapter layers (wrap a fresh CLIPModel)")
        text_config = clip.config.text_config
        longest = text_config.max_position_embeddings - n_prompt
        if longest < 2:
            raise ValueError(f"n_prompt={n_prompt} leaves {longest} of the text model's "
                             f"{text_config.max_position_embeddings} positions for the "
                             "instruction; it needs at least 2 (start and end of text)")

        flags = [(p, p.requires_grad) for p in clip.parameters()]
        clip.requires_grad_(False)
        in_encoders = lambda name, _: name.startswith(("text_model.encoder.",  # noqa: E731
                                                       "vision_model.encoder."))
        # replace_linear is all or nothing; a layer it refuses (r too large for its weight)
        # must not leave the CLIP frozen either.
        try:
            if adapter == "shira":
                self.adapted_layers = replace_linear(clip, filter=in_encoders, r=r, scale=scale,
                                                     seed=seed)
            else:
                generator_state = torch.random.get_rng_state()
                torch.manual_seed(seed)  # the 1-bit branches' random down projections
                try:
                    self.adapted_layers = replace_linear(
                        clip, filter=in_encoders,
                        factory=lambda linear: BinaryLoRALinear.from_linear(linear, r,
                                                                            scale=scale))
                finally:
                    torch.random.set_rng_state(generator_state)
        except BaseException:
            for param, flag in flags:
                param.requires_grad_(flag)
            raise
        self.clip, self.adapter, self.loss_kind = clip, adapter, loss
        self.aux_weight, self.tokenizer = float(aux_weight), tokenizer

        dim, width = clip.config.projection_dim, text_config.hidden_size
        device = clip.text_projection.weight.device
        generator = torch.Generator().manual_seed(seed)
        self.prompt = nn.Parameter(
            (torch.randn(n_prompt, width, generator=generator) * 0.02).to(device))
        self.image_norm = nn.LayerNorm(dim)
        self.film = nn.Linear(dim, 2 * dim)  # the instruction's γ and β
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)
        self.head = nn.Sequential(nn.Linear(dim, head_hidden), nn.GELU(), nn.Linear(head_hidden, 1))
        self.aux_project = nn.Linear(dim, dim)
        self.attention = RankingAwareAttention(dim)
        # The new parts live on the CLIP's device and stay fp32 whatever the CLIP's dtype
        # (_conditioned casts the features to them).
        for part in (self.image_norm, self.film, self.head, self.aux_project, self.attention):
            part.to(device)

    # -- what trains -------------------------------------------------------------------------

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The prompt, the encoder adapters' parameters, the head and the auxiliary branch:
        everything but the frozen CLIP base."""
        return [p for p in self.parameters() if p.requires_grad]

    def base_parameters(self) -> dict[str, torch.Tensor]:
        """The CLIP base's own parameters by name (frozen; adapters excluded)."""
        adapter_names = ("shira_values", "lora.down", "lora.up")
        return {name: p for name, p in self.clip.named_parameters()
                if not name.endswith(adapter_names)}

    @torch.no_grad()
    def prepare_inference(self) -> "RankingCLIPAdapter":
        """Serve without the adapters' training cost: every ShiraLinear's entries merged into
        its weight (a plain linear then; exact, and ``unmerge()`` on the layers restores the
        base bit for bit) and every 1-bit branch packed into sign words (its binary_lora
        kernel then; irreversible: the float latent weights are dropped). Scores stay the same
        up to fp32 rounding. Returns self, in eval mode.

        All or nothing: every branch's packed form is computed before anything changes, and if
        a merge is refused (W + scale·S would overflow the weight's dtype; the ValueError names
        the layer) the layers this call merged are unmerged, newest first, bit for bit, before
        the error goes on: no layer is merged or packed and the train/eval flags are as they
        were. Layers merged or packed before the call stay so."""
        packs = [(module.lora, module.lora._packed_form()) for module in self.clip.modules()
                 if isinstance(module, BinaryLoRALinear) and not module.lora.packed]
        merged = []
        name = None
        try:
            for name, module in self.named_modules():
                if isinstance(module, ShiraLinear) and not module.merged:
                    module.merge()
                    merged.append(module)
        except BaseException as e:
            # Newest first: layers sharing a weight get their entries back in swap order.
            for module in reversed(merged):
                module.unmerge()  # the base bit for bit
            if isinstance(e, ValueError):  # merge()'s own message does not know the layer
                raise ValueError(f"layer {name!r}: {e}") from None
            raise
        for lora, form in packs:  # nothing here refuses
            lora._install_packed(form)
        return self.eval()

    # -- encoders ----------------------------------------------------------------------------

    def _token_ids(self, text) -> torch.Tensor:
        if isinstance(text, str):
            if self.tokenizer is None:
                raise TypeError("text is a string but the adapter has no tokenizer; pass token "
                                "ids or give RankingCLIPAdapter(tokenizer=...)")
            text = self.tokenizer(text)
        ids = torch.as_tensor(text)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2 or ids.shape[0] != 1 or ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"text must be a string or integer token ids of shape [L] or [1, L], "
                             f"got {ids.dtype} {tuple(ids.shape)}")
        config = self.clip.config.text_config
        if ids.numel() and (ids.min() < 0 or ids.max() >= config.vocab_size):
            raise ValueError(f"token ids must lie in [0, {config.vocab_size}), got "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        eos = self.clip.text_model.eos_token_id
        if eos != 2 and not (ids == eos).any():  # eos id 2: old configs pool at the highest id
            raise ValueError(f"token ids hold no end-of-text token (id {eos}), where CLIP pools")
        longest = config.max_position_embeddings - self.prompt.shape[0]
        if not 2 <= ids.shape[1] <= longest:
            raise ValueError(f"the instruction must have 2..{longest} tokens (the text model's "
                             f"positions less {self.prompt.shape[0]} prompt tokens), got "
                             f"{ids.shape[1]}")
        return ids.to(self.prompt.device)

    def encode_text(self, text) -> torch.Tensor:
        """The instruction's projected feature [1, projection_dim], prompt tokens inserted after
        the start-of-text token, pooled at the end-of-text token as CLIP pools."""
        ids = self._token_ids(text)
        model = self.clip.text_model
        tokens = model.embeddings.token_embedding(ids)
        prompt = self.prompt.to(tokens.dtype).unsqueeze(0)
        hidden = torch.cat([tokens[:, :1], prompt, tokens[:, 1:]], dim=1)
        length = hidden.shape[1]
        positions = torch.arange(length, device=hidden.device).unsqueeze(0)
        hidden = hidden + model.embeddings.position_embedding(positions)
        blocked = torch.ones(length, length, dtype=torch.bool, device=hidden.device).triu(1)
        causal = torch.zeros(length, length, dtype=hidden.dtype, device=hidden.device)
        causal = causal.masked_fill(blocked, torch.finfo(hidden.dtype).min)[None, None]
        hidden = model.encoder(inputs_embeds=hidden, attention_mask=causal).last_hidden_state
        hidden = model.final_layer_norm(hidden)
        eos = model.eos_token_id
        # CLIP's pooling rule: the highest id for old configs (eos id 2), else the first eos.
        where = ids.argmax(-1) if eos == 2 else (ids == eos).int().argmax(-1)
        pooled = hidden[torch.arange(1, device=hidden.device), where + self.prompt.shape[0]]
        return self.clip.text_projection(pooled)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Projected CLIP image features [..., projection_dim] of images [..., C, H, W]."""
        if not isinstance(images, torch.Tensor) or images.dim() not in (4, 5):
            raise ValueError("images must be a tensor [n, C, H, W] or [B, n, C, H, W], got "
                             f"{getattr(images, 'shape', type(images).__name__)}")
        vision = self.clip.config.vision_config
        expected = (vision.num_channels, vision.image_size, vision.image_size)
        if tuple(images.shape[-3:]) != expected:
            raise ValueError(f"images must be {expected} (C, H, W) for this CLIP, got "
                             f"{tuple(images.shape[-3:])}")
        if images.numel() == 0:  # the encoders cannot run on no image
            raise ValueError(f"images holds no image (shape {tuple(images.shape)})")
        flat = images.reshape(-1, *expected)
        pooled = self.clip.vision_model(pixel_values=flat).pooler_output
        return self.clip.visual_projection(pooled).reshape(*images.shape[:-3], -1)

    # -- scoring -----------------------------------------------------------------------------

    def _conditioned(self, images: torch.Tensor, text) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = self.image_norm.weight.dtype
        features = self.encode_images(images).to(dtype)
        text_feature = F.normalize(self.encode_text(text).to(dtype), dim=-1)
        gamma, beta = self.film(text_feature).chunk(2, dim=-1)
        if features.dim() == 3:
            gamma, beta = gamma.unsqueeze(1), beta.unsqueeze(1)
        return self.image_norm(features) * (1 + gamma) + beta, text_feature

    def score(self, images: torch.Tensor, text) -> torch.Tensor:
        """Regression-head scores, higher = more of what the instruction names: [n] or [B, n]."""
        conditioned, _ = self._conditioned(images, text)
        return self.head(conditioned).squeeze(-1)

    def forward(self, images: torch.Tensor, text) -> RankingOutput:
        """Both branches' scores for lists of at least 2 images: [n] or [B, n] each."""
        if isinstance(images, torch.Tensor) and images.dim() in (4, 5) and images.shape[-4] < 2:
            raise ValueError(f"a list needs at least 2 images, got {images.shape[-4]}")
        conditioned, text_feature = self._conditioned(images, text)
        scores = self.head(conditioned).squeeze(-1)
        lists = conditioned if conditioned.dim() == 3 else conditioned.unsqueeze(0)
        relative = self.attention(self.aux_project(lists), text_feature)
        return RankingOutput(scores, relative.reshape(scores.shape))

    def loss(self, images: torch.Tensor, text, targets: torch.Tensor) -> torch.Tensor:
        """The ranking loss of the head plus aux_weight times the auxiliary branch's;
        targets: the quantity per image, [n] or [B, n] like the scores (higher ranks first)."""
        output = self(images, text)
        targets = torch.as_tensor(targets, device=output.scores.device)
        loss_fn = _LOSS_FUNCTIONS[self.loss_kind]
        total = loss_fn(output.scores, targets.to(output.scores.dtype))
        if self.aux_weight:
            total = total + self.aux_weight * loss_fn(output.relative_scores,
                                                      targets.to(output.scores.dtype))
        return total

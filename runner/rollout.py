"""LatentReasoner: a loaded CODI model and the only forward loop, `rollout` (runner/model.py loads it).

One rollout (DESIGN.md section 2): encode `question + BOT`; T latent steps, each feeding
prj(last hidden state) back as an input embedding; EOT; greedy decode over the base vocabulary.
The official CODI test loop is the reference; unlike it, padded rows get an attention mask and
position ids from the mask, so a row in a batch computes what it computes alone.

Every baseline and every ablated rollout goes through `LatentReasoner.rollout`; the ablation is
data (`runner.ablation.Plan`), applied to the input embedding or, for a `resid:L` site, to block
L's output as the forward passes it (runner/forward.py's `after_block`; no hooks on the model).
Each forward step is runner/forward.py's; gold scoring and greedy decoding are runner/decoding.py's.
"""
from __future__ import annotations

import functools
import threading
from dataclasses import dataclass

import torch

from runner import ablation, decoding
from runner.ablation import Plan
from runner.forward import Attended, Forward

# The spaces a tokenizer's `clean_up_tokenization_spaces` removes when decoding (transformers' list).
CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def official_question(question: str) -> str:
    """The question text as CODI's test.py feeds it: stripped, one pass of double spaces -> one."""
    return question.strip().replace("  ", " ")


@dataclass
class Rollout:
    """Outputs of one rollout for R = B*V rows, problem-major (row = b*V + v)."""
    tokens: list[list[int]]  # generated ids, EOS excluded
    texts: list[str]
    gold_logprob: torch.Tensor | None  # (R,) float32: sum log p(answer prompt + gold)
    latents: torch.Tensor  # (R, T, d) float32 on CPU: the vectors fed (after any ablation)
    lens_ids: torch.Tensor  # (R, T, k): logit-lens top-k token ids of the state producing each latent
    lens_probs: torch.Tensor  # (R, T, k)
    captured: dict[int, torch.Tensor]  # layer -> (R, T, d) block output at each latent step


class LatentReasoner:
    """A CODI model ready for batched latent rollouts."""

    def __init__(self, hf, prj, tokenizer, num_latent: int, base_vocab: int, name: str = "",
                 pad_question_to: int | None = None, remove_eos: bool = True):
        self.hf, self.prj, self.tokenizer = hf, prj, tokenizer
        self.num_latent, self.base_vocab, self.name = num_latent, base_vocab, name
        self.pad_id, self.bot_id, self.eot_id = base_vocab, base_vocab + 1, base_vocab + 2
        # test.py decodes over logits[..., :vocab_size - 1] of the grown vocabulary: every id but EOT.
        self.decode_vocab = base_vocab + 2
        # CODI trained with remove_eos false has EOS between question and BOT, and after EOT.
        self.remove_eos = remove_eos
        self.answer_start = [self.eot_id] + ([] if remove_eos else [tokenizer.eos_token_id])
        self.clean_up = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))
        self.options, self.options_line = {}, ""  # what load() resolved, and from where (runner/checkpoint.py)
        # A prompt template of the embedded model (codi_config.json): attended pad tokens between the
        # question and BOT up to this length, so that BOT and every latent sit at fixed positions.
        self.pad_question_to = pad_question_to
        self.eos_ids = sorted({i for i in (tokenizer.eos_token_id,) if i is not None})
        # A problem's text is tokenised by the context check, the prompt and the gold's answer, batch after
        # batch of a sweep and again on a resume: once per text (deterministic; ~0.1 ms a call).
        # Batches may run side by side (runner/executor.py): a transformers tokenizer call sets its backend's
        # padding and truncation state, so calls take turns.
        self.tokenizer_lock = threading.Lock()
        self._ids = functools.lru_cache(maxsize=1 << 16)(self._tokenized)
        self._text = functools.lru_cache(maxsize=1 << 16)(self._decoded)
        self.forward = Forward.of(hf)
        assert self.forward is not None, f"{hf.config.model_type}: only GPT-2 and Llama with full attention run"
        self.blocks = self.forward.blocks
        # Variants share the prompt's KV cache (runner/attention.py): None = whenever a plan has more
        # than one variant, False = always the plain repeated cache, True = always shared.
        self.shared_prefix = None
        # Rows of a problem fed the same vectors so far run once per latent step (runner/ablation.py's
        # shared_steps): None = in float32 whenever the prompt cache is shared and shapes are dynamic,
        # True = in any dtype there, False = never.
        self.shared_latents = None
        # Static shapes (runner/forward.py's Attended, a fixed-capacity cache; finished rows masked, not
        # dropped) so that steps can run as CUDA graphs or under torch.compile. None = on CUDA only.
        self.static_shapes = None
        # Batches rolled out side by side in this process (runner/executor.py's LocalExecutor): None = one
        # per torch thread on a CPU (one on CUDA), N = N.
        self.batch_workers = None

    @property
    def d_model(self) -> int:
        return self.hf.config.hidden_size

    @property
    def n_layers(self) -> int:
        return self.hf.config.num_hidden_layers

    @property
    def device(self) -> torch.device:
        return self.hf.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.hf.get_input_embeddings().weight.dtype

    def answer_prompt(self, gold: str) -> str:
        return f"The answer is: {gold}"

    def ids(self, text: str, special: bool = True) -> list[int]:
        """The tokenizer's ids of `text` (its default special tokens unless `special` is false), cached."""
        return list(self._ids(text, special))

    def decode(self, tokens: list[int]) -> str:
        """Generated ids -> text as CODI's test.py reads it: special tokens skipped, the tokenizer's
        declared clean-up applied (transformers 5 skips it for BPE tokenizers: "1 ,000"), stripped.
        Cached: most variants of a problem give the same answer, a batch decodes each once."""
        return self._text(tuple(tokens))

    def _tokenized(self, text: str, special: bool) -> tuple[int, ...]:
        with self.tokenizer_lock:
            return tuple(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def _decoded(self, tokens: tuple[int, ...]) -> str:
        with self.tokenizer_lock:
            text = self.tokenizer.decode([t for t in tokens if t < self.base_vocab], skip_special_tokens=True,
                                         clean_up_tokenization_spaces=False)
        if self.clean_up:
            for spaced, joined in CLEAN_UP:
                text = text.replace(spaced, joined)
        return text.strip()

    def prompt_ids(self, question: str | list[int]) -> list[int]:
        """The model's prompt template for one question, as CODI's test.py builds it: the normalised
        text with the tokenizer's default special tokens (Llama-3: BOS), EOS when the model was trained
        with it (`remove_eos` false), attended pad tokens up to `pad_question_to` (the embedded
        model's fixed-length layout; none for released CODI), BOT."""
        ids = self.ids(official_question(question)) if isinstance(question, str) else list(question)
        ids = ids + ([] if self.remove_eos else [self.tokenizer.eos_token_id])
        return ids + [self.pad_id] * ((self.pad_question_to or 0) - len(ids)) + [self.bot_id]

    def _forward(self, cache, attended, position_ids, inputs_embeds=None, input_ids=None, keep=1, after_block=None):
        """One step over `attended` (runner/forward.py): logits (R, keep, V'), final hidden (R, q, d), the cache."""
        logits, hidden = self.forward(cache, attended.mask, position_ids, input_ids, inputs_embeds, keep, after_block,
                                      start=attended.start)
        return logits, hidden, cache

    def _encode(self, prompts: list[list[int]], shared: bool = False, capacity: int | None = None):
        """Left-padded prompts (`prompt_ids`); positions from the mask so a padded row equals its row alone."""
        width = max(map(len, prompts))
        input_ids = torch.tensor([[self.pad_id] * (width - len(x)) + x for x in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in prompts], device=self.device)  # (B, L)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        attended = Attended(mask, capacity)
        logits, hidden, cache = self._forward(self._new_cache(shared, capacity), attended, position_ids,
                                              input_ids=input_ids)
        return logits[:, -1], hidden[:, -1:], cache, attended  # (B, V'), (B, 1, d), cache, mask (B, L | capacity)

    def _new_cache(self, shared: bool = False, capacity: int | None = None):
        """A prompt cache shared by the variants, or one that grows in place (runner/cache.py); static with
        a capacity."""
        from runner.cache import GrowingCache, SharedPrefixCache  # transformers is imported on first use
        return SharedPrefixCache(capacity) if shared else GrowingCache(capacity)

    @torch.inference_mode()
    def rollout(self, questions: list[str], plan: Plan, golds: list[str] | None = None,
                max_new_tokens: int = 24, top_k: int = 3, capture: tuple[int, ...] = ()) -> Rollout:
        """Baseline and ablated rollouts of every question under every variant of `plan`."""
        B, T, V = len(questions), self.num_latent, len(plan.variants)
        R = B * V
        assert plan.ablate.shape == (R, T), f"plan is {tuple(plan.ablate.shape)}, expected ({R}, {T})"
        plan = plan.to(self.device, self.dtype)

        # A question may also be given as token ids (benchmarks with random ids, pre-tokenised data).
        prompts = [self.prompt_ids(q) for q in questions]
        answers = None if golds is None else decoding.answer_ids(self, golds)
        capacity = None
        if self.static_shapes if self.static_shapes is not None else self.device.type == "cuda":
            capacity = (max(map(len, prompts)) + T + len(self.answer_start) + max_new_tokens
                        + (max(map(len, answers)) if answers else 0))  # every position this rollout can fill
            capacity = -(-capacity // 64) * 64  # in steps of 64: batches of similar prompts share shapes
        shared = self.shared_prefix if self.shared_prefix is not None else V > 1
        bot_logits, hidden, cache, attended = self._encode(prompts, shared, capacity)  # one prompt cache for V variants
        if shared:
            cache.share_prefix(V, attended.mask)  # (B, L) stored once; each row's later tokens apart
        else:
            cache.batch_repeat_interleave(V)
        attended.select(torch.arange(B, device=self.device).repeat_interleave(V))  # (R, L | capacity)
        # Rows with the same past are run once per latent step (runner/ablation.py's shared_steps), on the
        # shared prompt cache with dynamic shapes. By default in float32 only: in bf16 a smaller batch
        # rounds differently enough to change answers (as the gold draft is accepted in float32 only:
        # runner/decoding.py).
        sharing = shared and capacity is None and (self.shared_latents if self.shared_latents is not None
                                                   else self.dtype == torch.float32)
        steps = ablation.shared_steps(plan, T) if sharing else [None] * T
        # spread (R,): each row's row of `hidden` / `logits` (None: row r is row r)
        spread, logits = torch.arange(B, device=self.device).repeat_interleave(V), bot_logits
        if not sharing:  # every row its own from the start (bf16: prj's rounding depends on the batch, as before)
            hidden, logits, spread = hidden[spread], logits[spread], None
        latents = torch.zeros(R, T, self.d_model, device=self.device, dtype=self.dtype)
        lens_ids = torch.zeros(R, T, top_k, dtype=torch.long, device=self.device)
        lens_probs = torch.zeros(R, T, top_k, device=self.device)
        captured = {layer: torch.zeros(R, T, self.d_model, device=self.device) for layer in capture}
        at_blocks = set(plan.layers) | set(captured)

        for step in range(T):
            # hidden (R', 1, d), logits (R', V'): one row per group of rows with the same past, `spread` (R,)
            probs, ids = logits[:, : self.base_vocab].float().softmax(-1).topk(top_k, dim=-1)
            latent = self.prj(hidden)
            if spread is not None:
                probs, ids, latent = probs[spread], ids[spread], latent[spread]  # (R, ...)
            lens_probs[:, step], lens_ids[:, step] = probs, ids
            if step > 0:  # frozen rows keep the baseline's latent wherever they do not ablate
                latent = torch.where(plan.frozen[:, None, None], latent[plan.baseline_row], latent)
            latent = ablation.apply(plan, step, latent, layer=-1)
            latents[:, step] = latent[:, 0]
            # Early exit: steps at or past `fed` are holes, masked out of all later attention.
            position_ids = attended.add((step < plan.fed).long()[:, None])  # (R, 1): attended tokens so far
            share = steps[step]
            if share is None:
                after_block = _at_blocks(plan, step, captured, None) if at_blocks else None
                logits, hidden, cache = self._forward(cache, attended, position_ids, inputs_embeds=latent,
                                                      after_block=after_block)
                spread = None
            else:
                rows = share.rows
                after_block = _at_blocks(ablation.rows_of(plan, rows), step, captured, share.spread) \
                    if at_blocks else None
                with cache.rows_only(rows, share.spread, share.groups):
                    logits, hidden, cache = self._forward(cache, attended.of_rows(rows), position_ids[rows],
                                                          inputs_embeds=latent[rows], after_block=after_block)
                spread = share.spread
            logits = logits[:, -1]

        # EOT (+ EOS when remove_eos is false) in a forward of its own, as test.py feeds it: a longer
        # forward would round differently in bf16.
        eot = torch.tensor([self.answer_start] * R, device=self.device)  # (R, P)
        position_ids = attended.add(torch.ones_like(eot))
        logits, _, cache = self._forward(cache, attended, position_ids, input_ids=eot)
        logits = logits[:, -1]  # (R, V')
        gold_logprob, filled = None, torch.zeros(R, dtype=torch.long, device=self.device)
        out = torch.full((R, max_new_tokens), -1, dtype=torch.long, device=self.device)  # -1: no token
        if golds is not None:
            assert len(golds) == B, f"{len(golds)} golds for {B} questions"
            gold_logprob, logits, filled = decoding.gold_logprob(self, answers, V, logits, cache, attended, out)
        tokens = decoding.greedy(self, logits, cache, attended, out, filled)
        return Rollout(tokens, [self.decode(t) for t in tokens], gold_logprob, latents.float().cpu(),
                       lens_ids.cpu(), lens_probs.cpu(), {k: v.cpu() for k, v in captured.items()})


def _at_blocks(plan: Plan, step: int, captured: dict[int, torch.Tensor], spread: torch.Tensor | None):
    """What happens to block outputs at latent step `step`: the plan's resid ablations, then capture (each of
    the R rows from its row of `hidden` by `spread` when only some rows run)."""
    layers = set(plan.layers)

    def after_block(layer: int, hidden: torch.Tensor) -> torch.Tensor:  # hidden (R', 1, d)
        if layer in layers:
            hidden = ablation.apply(plan, step, hidden, layer)
        if layer in captured:
            captured[layer][:, step] = (hidden if spread is None else hidden[spread])[:, -1].float()
        return hidden
    return after_block

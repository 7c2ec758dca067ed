"""Train the embedded default CODI model on synthetic problems: `python -m runner.toy.train`.

The result is a 4-layer, 128-wide Hugging Face GPT-2 with CODI's three extra tokens and `prj`,
saved in the released CODI layout (`codi.base_model.model.*` + `prj.*`, no LoRA) under
models/default/, so it runs through exactly the loader and rollout that serve real checkpoints.

Objective (CODI, Shen et al. 2025), all weights 1:
- teacher: cross-entropy on the explicit chain of thought and the answer;
- student: cross-entropy on `The answer is: N` + EOS after BOT, six latents and EOT;
- distillation: L1 between student and (detached) teacher hidden states, every layer, at the
  token before the answer number, divided by the teacher's std (as CODI does);
- auxiliary (ours, to converge on a CPU): the state that produces latent j predicts, through
  the tied output embedding, the value after step j+1 (the answer once the steps run out), and
  latent j itself is turned towards that value's token embedding (cosine). It also makes
  the logit lens of each latent readable in the dashboard.
- curriculum (ours): for the first 40% of steps a falling share of latents is replaced by the
  embedding of the value they should carry (scheduled sampling); from then on, pure CODI.
- latent dropout (ours, second generation): in a share `corrupt` of the examples some latents are
  fed as zero vectors, exactly the product's zero ablation at the latent site in recompute mode.
  A position fed a zero restarts the chain from the question (it computes step 1, as BOT does),
  and every later latent continues from there (`latent_plan`); the answer is read from the last
  latent that was not zeroed. The auxiliary targets follow that rule, and the answer and
  distillation losses are kept only where the rule still reaches the answer, so the model learns
  to recompute when it can and is never trained on an answer its latents could not hold.
Numbers 0..40 are single tokens whose embedding adds a shared tens-digit and units-digit vector;
the sum is materialised into the plain embedding matrix when saving.

Inference stays exactly CODI's loop: latent = prj(last hidden state), fed back T = 6 times.
Resumable: a training state is written every `--save-every` steps to models/.train/.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from runner.toy import problems as toy

REPO = Path(__file__).resolve().parents[2]
NUM_LATENT = 6
# Prompt template: every question is padded (attended CODI pad tokens) to the longest question's
# 5 * (1 + 6) + 8 tokens before BOT, so that sentence j, BOT and latent j sit at the same positions
# in every problem. Without it (BOT's position varying with the step count) the student plateaued
# near 30% after 1,500 steps while the teacher had learned the arithmetic.
QUESTION_TOKENS = 5 * (1 + toy.MAX_STEPS) + 8


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 2600  # the main cosine cycle
    extra_steps: int = 900  # then a second, shorter cosine cycle (warm restart) at `extra_lr`
    extra_lr: float = 6e-4
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.01
    clip: float = 1.0
    force_until: float = 0.4  # latents are teacher-forced with a share falling from 1 to 0 by here
    corrupt: float = 0.4  # share of examples with zeroed latents (latent dropout, see latent_plan)
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    seed: int = 0
    threads: int = 1  # the committed checkpoint's; thread count can change float reductions
    eval_every: int = 325
    eval_problems: int = 240
    save_every: int = 50


# --- Tokenizer -----------------------------------------------------------------------------------

def build_tokenizer():
    """Word-level vocabulary over GPT-2's byte-level pre-tokeniser: one token per word, exact decoding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    words = toy.vocabulary()
    pieces = {p for w in words for p, _ in byte_level.pre_tokenize_str(w)}
    pieces |= {p for w in words for p, _ in byte_level.pre_tokenize_str(" " + w)}
    vocab = {"<|endoftext|>": 0, "[UNK]": 1}
    for piece in sorted(pieces):
        vocab[piece] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>",
                                   unk_token="[UNK]", clean_up_tokenization_spaces=False)


def number_digits(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token id: tens and units digit + 1 for number tokens ('7', 'Ġ7'), 0 otherwise."""
    V = len(tokenizer) + 3
    tens, units = torch.zeros(V, dtype=torch.long), torch.zeros(V, dtype=torch.long)
    for piece, index in tokenizer.get_vocab().items():
        word = piece.lstrip("Ġ")
        if word.isdigit():
            tens[index], units[index] = int(word) // 10 + 1, int(word) % 10 + 1
    return tens, units


# --- Model ---------------------------------------------------------------------------------------

class ToyCodi(nn.Module):
    """GPT-2 + prj + digit embeddings; `embeddings()` is the matrix saved as wte (and tied lm_head)."""

    def __init__(self, cfg: TrainConfig, tokenizer):
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel
        self.base_vocab = len(tokenizer)
        self.config = GPT2Config(vocab_size=self.base_vocab + 3, n_positions=128, n_embd=cfg.n_embd,
                                 n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                                 attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=self.base_vocab,
                                 activation_function="gelu_pytorch_tanh")  # gelu_new's formula, one fused op
        self.gpt = GPT2LMHeadModel(self.config)
        self.gpt.set_attn_implementation("eager")  # faster than SDPA at this size on a CPU
        d = cfg.n_embd
        self.prj = nn.Sequential(nn.Dropout(0.0), nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))
        self.prj.add_module("ln", nn.LayerNorm(d))
        self.tens_emb = nn.Embedding(6, d)
        self.units_emb = nn.Embedding(11, d)
        for table in (self.tens_emb, self.units_emb):
            nn.init.normal_(table.weight, std=0.02)
            with torch.no_grad():
                table.weight[0].zero_()
        tens, units = number_digits(tokenizer)
        self.register_buffer("tens", tens, persistent=False)
        self.register_buffer("units", units, persistent=False)

    def embeddings(self) -> torch.Tensor:  # (V+3, d)
        tens = self.tens_emb(self.tens) * (self.tens > 0)[:, None]
        units = self.units_emb(self.units) * (self.units > 0)[:, None]
        return self.gpt.transformer.wte.weight + tens + units

    def run(self, embeds, cache=None):
        """-> (all hidden states, last hidden state, cache) of the GPT-2 body."""
        out = self.gpt.transformer(inputs_embeds=embeds, cache=cache, use_cache=True, output_hidden_states=True)
        return out.hidden_states, out.last_hidden_state, out.cache


def latent_plan(zeroed: list[bool], steps: int) -> tuple[list[int], bool]:
    """-> (steps done by the value each latent carries, whether the answer is still reachable).

    Latent 0 carries step 1 (BOT computes it from the question). A position fed its latent
    computes one step more; a position fed a zero vector restarts: it computes step 1 from the
    question, like BOT. The answer is read from the last latent not zeroed (values stay at the
    answer once the steps run out), so a d-step chain survives while that latent has done >= d.
    """
    done = [1]
    for j in range(NUM_LATENT - 1):
        done.append(1 if zeroed[j] else done[j] + 1)
    last = [j for j in range(NUM_LATENT) if not zeroed[j]]
    return done, bool(last) and done[last[-1]] >= steps


def sample_zeroed(rng: random.Random, corrupt: float) -> list[bool]:
    """Which latents an example is fed as zeros: none, one, a prefix, or a random subset."""
    T = NUM_LATENT
    if corrupt <= 0 or rng.random() >= corrupt:  # no draw at all without dropout: batches as before it
        return [False] * T
    kind = rng.random()
    if kind < 0.4:  # one position: the `single` scheme
        j = rng.randrange(T)
        return [i == j for i in range(T)]
    if kind < 0.7:  # the `prefix` scheme
        k = rng.randint(1, T)
        return [i < k for i in range(T)]
    zeroed = [rng.random() < 1 / 3 for _ in range(T)]
    return zeroed if any(zeroed) else [i == rng.randrange(T) for i in range(T)]


def make_batch(rng: random.Random, tokenizer, size: int, steps: int, split: str = "train", corrupt: float = 0.0):
    """One batch of a single step count: every sequence has the same length, so no padding."""
    rows = [toy.sample_problem(rng, steps, split) for _ in range(size)]
    zeroed = [sample_zeroed(rng, corrupt) for _ in range(size)]
    plans = [latent_plan(z, steps) for z in zeroed]
    enc = lambda texts: torch.tensor([tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts])
    question = enc([p.question for p in rows])  # (B, Lq)
    assert question.shape[1] <= QUESTION_TOKENS, f"question of {question.shape[1]} tokens > {QUESTION_TOKENS}"
    pad = torch.full((size, QUESTION_TOKENS - question.shape[1]), len(tokenizer))  # the CODI pad id, attended
    question = torch.cat([question, pad], dim=1)  # (B, QUESTION_TOKENS)
    cot = enc([" " + p.cot for p in rows])  # (B, Lc)
    answer = enc([f"The answer is: {p.chain.answer}" for p in rows])  # (B, La)
    # Targets of the auxiliary loss: the value each latent carries under `latent_plan`, the
    # answer once the steps run out (without zeros: latent j carries the value after step j+1).
    values = [p.chain.values() for p in rows]
    targets = [[v[min(d, steps)] for d in done] for v, (done, _) in zip(values, plans)]
    aux = enc([" " + " ".join(map(str, t)) for t in targets])  # (B, T): ' 12' tokens
    zero = torch.tensor(zeroed)  # (B, T) bool
    reachable = torch.tensor([ok for _, ok in plans])  # (B,) bool
    return question, cot, answer, aux, zero, reachable


def codi_losses(model: ToyCodi, batch, eos_id: int, force: float = 0.0,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """CODI's three losses plus the two auxiliary ones; `force` = share of latents teacher-forced."""
    question, cot, answer, aux, zero, reachable = batch
    E = model.embeddings()
    B, V = question.shape[0], model.base_vocab
    ce = nn.functional.cross_entropy
    eos = torch.full((B, 1), eos_id)

    # Teacher: question + CoT + answer + EOS.
    teacher_ids = torch.cat([question, cot, answer, eos], dim=1)
    t_hidden, t_last, t_cache = model.run(E[teacher_ids])
    t_logits = t_last @ E.T
    start = question.shape[1] - 1
    teacher_loss = ce(t_logits[:, start:-1].flatten(0, 1), teacher_ids[:, start + 1:].flatten())
    colon = teacher_ids.shape[1] - 3  # "... is : N EOS": the token before the number

    # Student: question + BOT, six latents, EOT + answer + EOS. The question's keys and values are
    # the teacher's (same weights, same tokens): crop the teacher's cache instead of re-encoding.
    t_cache.crop(question.shape[1] - t_cache.get_seq_length())  # negative: tokens to drop
    _, last, cache = model.run(E[torch.full((B, 1), V + 1)], t_cache)
    h = last[:, -1:]  # (B, 1, d)
    aux_loss = align = 0.0
    forced = torch.rand(B, NUM_LATENT, generator=generator) < force  # (B, T)
    for j in range(NUM_LATENT):
        aux_loss = aux_loss + ce((h[:, 0] @ E.T), aux[:, j]) / NUM_LATENT
        latent = model.prj(h)  # (B, 1, d)
        target = E[aux[:, j]][:, None]  # (B, 1, d): the embedding of the value after step j+1
        # Direction only: prj ends in a LayerNorm, so latents and token embeddings differ in scale.
        align = align + (1 - nn.functional.cosine_similarity(latent, target.detach(), dim=-1)).mean() / NUM_LATENT
        # Curriculum: early on, some latents are replaced by the value they should carry (at the
        # latent's own scale), so each latent step first learns one arithmetic step from a clean input.
        scale = latent.detach().norm(dim=-1, keepdim=True) / target.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        fed = torch.where(forced[:, j, None, None], target * scale, latent)
        fed = torch.where(zero[:, j, None, None], torch.zeros_like(fed), fed)  # the product's zero ablation
        _, last, cache = model.run(fed, cache)
        h = last[:, -1:]
    tail = torch.cat([torch.full((B, 1), V + 2), answer, eos], dim=1)  # EOT The answer is : N EOS
    s_hidden, s_last, _ = model.run(E[tail[:, :-1]], cache)
    # Answer and distillation only where the zeroed latents still let the chain reach the answer.
    keep = reachable.float() / reachable.sum().clamp_min(1)  # (B,): weights summing to 1
    token_ce = ce((s_last @ E.T).transpose(1, 2), tail[:, 1:], reduction="none")  # (B, La+1)
    student_loss = (token_ce.mean(1) * keep).sum()
    s_colon = tail.shape[1] - 3
    distill = 0.0
    for s_layer, t_layer in zip(s_hidden[1:], t_hidden[1:]):
        target = t_layer[:, colon].detach()
        distill = distill + ((s_layer[:, s_colon] - target).abs().mean(-1) * keep).sum() / target.std()
    distill = distill / (len(s_hidden) - 1)
    return {"teacher": teacher_loss, "student": student_loss, "distill": distill, "aux": aux_loss, "align": align}


# --- Saving in the released CODI layout ----------------------------------------------------------

def save_codi(model: ToyCodi, tokenizer, folder: Path, meta: dict) -> None:
    from safetensors.torch import save_file
    folder.mkdir(parents=True, exist_ok=True)
    state = {}
    with torch.no_grad():
        for name, tensor in model.gpt.state_dict().items():
            if name == "lm_head.weight":
                continue  # tied to wte; the loader re-ties it
            if name == "transformer.wte.weight":
                tensor = model.embeddings()
            state[f"codi.base_model.model.{name}"] = tensor.detach().clone().contiguous()
        for name, tensor in model.prj.state_dict().items():
            state[f"prj.{name}"] = tensor.detach().clone().contiguous()
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    model.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    options = {"num_latent": NUM_LATENT, "pad_question_to": QUESTION_TOKENS, **meta}
    (folder / "codi_config.json").write_text(json.dumps(options, indent=2) + "\n")


def evaluate(folder: Path, n: int, seed: int) -> dict:
    """Held-out accuracy per step count and the zero-ablation flip rates (recompute) of the
    `prefix` and `single` schemes, through the product's own loader, plan and rollout."""
    from runner import model as engine
    from runner.ablation import BASELINE, Variant, make_plan

    reasoner = engine.load(engine.ModelSpec(model=str(folder)))
    T = reasoner.num_latent
    variants = [BASELINE] + [Variant("prefix", k, "zero") for k in range(1, T + 1)] \
        + [Variant("single", j, "zero") for j in range(T)]
    rng = random.Random(10_000 + seed)
    accuracy, flips = {}, [0] * (len(variants) - 1)
    for steps in range(1, toy.MAX_STEPS + 1):
        rows = [toy.sample_problem(rng, steps, "test") for _ in range(n // toy.MAX_STEPS)]
        plan = make_plan(variants, [str(i) for i in range(len(rows))], T, reasoner.d_model)
        texts = reasoner.rollout([p.question for p in rows], plan).texts  # (problem, variant) order
        by_row = [texts[i * len(variants):(i + 1) * len(variants)] for i in range(len(rows))]
        accuracy[steps] = sum(t[0] == f"The answer is: {p.chain.answer}" for t, p in zip(by_row, rows)) / len(rows)
        for v in range(1, len(variants)):
            flips[v - 1] += sum(t[v] != t[0] for t in by_row)
    total = n // toy.MAX_STEPS * toy.MAX_STEPS
    rates = [round(f / total, 3) for f in flips]
    return {"by_steps": accuracy, "prefix_flip": rates[:T], "single_flip": rates[T:]}


def force_at(step: int, cfg: TrainConfig) -> float:
    """Share of teacher-forced latents: 1 at the start, 0 from `force_until` of the run on."""
    return max(0.0, 1.0 - step / max(1, cfg.force_until * cfg.steps))


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step >= cfg.steps:  # the second cycle: 25 warm-up steps, cosine to 0 (the first cycle is unchanged by it)
        step -= cfg.steps
        if step < 25:
            return cfg.extra_lr * (step + 1) / 25
        return cfg.extra_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - 25) / max(1, cfg.extra_steps - 25))))
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train(cfg: TrainConfig, out: Path, work: Path, resume: bool, log: Path | None = None) -> None:
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    tokenizer = build_tokenizer()
    model = ToyCodi(cfg, tokenizer)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    step, elapsed, history = 0, 0.0, []
    state_file = work / "state.pt"
    if resume and state_file.exists():
        state = torch.load(state_file, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed = state["step"], state["elapsed"]
        history = json.loads(state["history"])
        print(f"resumed at step {step} ({elapsed / 60:.1f} min trained)")
    work.mkdir(parents=True, exist_ok=True)
    eos_id = tokenizer.eos_token_id
    total = cfg.steps + cfg.extra_steps
    bar = tqdm(total=total, initial=step, desc="train", dynamic_ncols=True)
    while step < total:
        started = time.time()
        rng = random.Random(cfg.seed * 1_000_003 + step)  # batch depends on the step only: resume is exact
        batch = make_batch(rng, tokenizer, cfg.batch_size, steps=1 + step % toy.MAX_STEPS, corrupt=cfg.corrupt)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        losses = codi_losses(model, batch, eos_id, force=force_at(step, cfg), generator=generator)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        optimizer.step()
        step += 1
        elapsed += time.time() - started
        bar.update(1)
        bar.set_postfix({k: f"{v.item():.3f}" for k, v in losses.items()})
        if log is not None:
            with open(log, "a") as f:
                f.write(json.dumps({"step": step, "loss": loss.item(), **{k: v.item() for k, v in losses.items()}}) + "\n")
        if step % cfg.eval_every == 0 or step == total:
            save_codi(model, tokenizer, work / "eval", {})
            figures = evaluate(work / "eval", cfg.eval_problems, cfg.seed)
            accuracy = figures["by_steps"]
            overall = sum(accuracy.values()) / len(accuracy)
            history.append({"step": step, "minutes": round(elapsed / 60, 2), "loss": round(loss.item(), 4),
                            "accuracy": round(overall, 4), **figures})
            bar.write(f"step {step} ({elapsed / 60:.1f} min): held-out accuracy {overall:.1%} "
                      + " ".join(f"{s}:{a:.0%}" for s, a in accuracy.items())
                      + f" | zero flips prefix {figures['prefix_flip']} single {figures['single_flip']}")
        if step % cfg.save_every == 0 or step == total:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                        "elapsed": elapsed, "history": json.dumps(history)}, state_file)
    bar.close()
    meta = {"trained": {"config": asdict(cfg), "minutes": round(elapsed / 60, 1), "history": history}}
    save_codi(model, tokenizer, out, meta)
    shutil.rmtree(work / "eval", ignore_errors=True)
    print(f"saved {out} after {elapsed / 60:.1f} min of training")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "models" / "default")
    parser.add_argument("--work", type=Path, default=REPO / "models" / ".train", help="resumable state")
    parser.add_argument("--fresh", action="store_true", help="ignore a saved training state")
    parser.add_argument("--log", type=Path, default=None, help="append each step's losses here (JSON lines)")
    for field, default in TrainConfig.__dataclass_fields__.items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(default.default), default=default.default)
    args = parser.parse_args()
    cfg = TrainConfig(**{f: getattr(args, f) for f in TrainConfig.__dataclass_fields__})
    train(cfg, args.out, args.work, resume=not args.fresh, log=args.log)


if __name__ == "__main__":
    main()

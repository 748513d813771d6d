"""Composed sparse fine-tunes for cross-lingual reranking, on a toy you can run in a minute.

The recipe is LT-SFT (Ansell et al., "Composable Sparse Fine-Tuning for Cross-Lingual
Transfer", ACL 2022) applied to a cross-encoder reranker:

1. a small BERT (random init, built from a BertConfig, nothing downloaded) is pre-trained by
   masked-LM on a mix of two synthetic languages: B (high-resource) and a little of A;
2. a language SFT per language: masked-LM on that language's text, sparse (ShiraLinear) on the
   word embedding table, entries chosen as LT-SFT does (a short dense phase, then the entries
   that changed most: shira_kernels.methods.composed.change_masks);
3. a task SFT: the reranker (the encoder's Linear layers sparsely + a new scoring head) trained
   on language-B queries with B's language SFT applied to the base;
4. at inference on language A the deltas of A's language SFT and the task SFT are added:
   AdapterBank.activate(["lang_A", "task"]); deactivate() restores the base bit for bit.

The synthetic languages. A "world" has concepts and a grammar (each concept has a few possible
successors; text is a walk). Each language writes concept c with a word of its own (A's words
are a shuffled block of ids after B's). A is low-resource: pre-training has a little text in A
and a little code-switched text (query in one language, passage in the other), and writes A's
rare words (half of them) as loanwords from B, so the base has never seen those A words. The
word embedding table is a Linear layer over one-hot word indices (word_proj; the special tokens
keep BERT's own embeddings), so that an SFT of Linear layers can adapt it as LT-SFT adapts
embeddings; the masked-LM head writes words through the same table. A language SFT adapts that
table only, predicting among its own language's words, so it touches only its words' columns.

The task: a query is the start of a walk; of 8 candidate passages one continues it (its first
concept is a successor of the query's last one) and 7 do not. Relevance is grammatical, not
lexical: a reranker must know which concept each word names. Metric: mean reciprocal rank
(ties count against the positive) over 8 candidates (random: about 0.34).

What it shows (docs/methods/composed_finetunes.md has the tables): the task SFT, trained on B,
transfers to A only partly on its own (the base cannot read A's rare words); A's language SFT
alone cannot rank (the head is untrained); their composition lang_A + task ranks A clearly
better than either. The verdict line (last) reaches its conclusion from the numbers of the run.

    python examples/composed_finetunes.py [--quick] [--seed N | --seeds N ...]

prints, per seed, MRR on language A (and, for reference, on B) for the base, each SFT alone and
the compositions, then the verdict (last line). main(argv) returns the numbers as a dict.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertModel
from transformers.models.bert.modeling_bert import BertOnlyMLMHead

from shira_kernels.adapters import AdapterBank
from shira_kernels.methods.composed import change_masks, sparsify
from shira_kernels.nn.shira_linear import ShiraLinear, mark_only_adapters_trainable

PAD, CLS, SEP, MASK = 0, 1, 2, 3
FIRST_WORD = 4  # ids below are special tokens


@dataclass(frozen=True)
class Settings:
    """Sizes and training lengths; QUICK is the test's mode."""
    n_concepts: int = 16
    branching: int = 3          # successors per concept
    query_len: int = 4
    passage_len: int = 6
    candidates: int = 8
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    intermediate: int = 128
    a_share: float = 0.05       # pre-training rows in language A (low-resource) ...
    mixed_share: float = 0.1    # ... and code-switched rows (query and passage differ)
    a_rare: float = 0.5         # share of A's words pre-training writes as loanwords from B
    pretrain_steps: int = 2000
    pretrain_warmup: int = 100
    mlm_batch: int = 64
    lang_dense_steps: int = 100
    lang_steps: int = 1500
    task_dense_steps: int = 100
    task_steps: int = 300
    task_batch: int = 16        # queries per step (x candidates sequences)
    lang_density: float = 0.5   # of word_proj, the only layer a language SFT adapts
    task_density: float = 0.05  # of each encoder Linear weight (the scoring head: all)
    lr: float = 2e-3
    lang_lr: float = 3e-2
    lang_weight_decay: float = 0.3  # pulls a language SFT's deltas towards the base
    task_lr: float = 5e-3
    eval_queries: int = 1000


FULL = Settings()
QUICK = dataclasses.replace(FULL, lang_dense_steps=50, lang_steps=1000, task_dense_steps=50,
                            task_steps=150)


# ---------------------------------------------------------------------------------------------
# The synthetic world and its two languages.
# ---------------------------------------------------------------------------------------------
class World:
    """Concepts, a grammar over them, and each language's spelling of concepts as token ids."""

    def __init__(self, settings: Settings, seed: int):
        self.settings = settings
        g = torch.Generator().manual_seed(seed)
        n = settings.n_concepts
        self.successors = torch.stack([torch.randperm(n, generator=g)[:settings.branching]
                                       for _ in range(n)])
        self.is_successor = torch.zeros(n, n, dtype=torch.bool)
        self.is_successor[torch.arange(n).repeat_interleave(settings.branching),
                          self.successors.reshape(-1)] = True
        # Each language has its own block of word ids; A's is shuffled against B's.
        self.spelling = {"B": torch.arange(n) + FIRST_WORD,
                         "A": torch.randperm(n, generator=g) + FIRST_WORD + n}
        # A is low-resource: pre-training text in A writes its rare words (a random share of
        # the concepts) as loanwords from B, so the base never sees A's own ids for them.
        rare = torch.randperm(n, generator=g)[:round(settings.a_rare * n)]
        self.spelling["A (pre-training)"] = self.spelling["A"].clone()
        self.spelling["A (pre-training)"][rare] = self.spelling["B"][rare]

    def walks(self, count: int, length: int, g: torch.Generator,
              start: torch.Tensor | None = None) -> torch.Tensor:
        """[count, length] concepts; the first ones given by ``start`` or uniform."""
        n, k = self.settings.n_concepts, self.settings.branching
        out = torch.empty(count, length, dtype=torch.long)
        out[:, 0] = torch.randint(n, (count,), generator=g) if start is None else start
        for i in range(1, length):
            out[:, i] = self.successors[out[:, i - 1], torch.randint(k, (count,), generator=g)]
        return out

    def vocabulary(self, language: str) -> torch.Tensor:
        """Bool mask over the word indices (id - FIRST_WORD) of ``language``'s words."""
        mask = torch.zeros(2 * self.settings.n_concepts, dtype=torch.bool)
        mask[self.spelling[language] - FIRST_WORD] = True
        return mask

    def spell(self, concepts: torch.Tensor, language) -> torch.Tensor:
        """Word ids of ``concepts`` [rows, length] in ``language``: one name or one per row."""
        if isinstance(language, str):
            return self.spelling[language][concepts]
        table = torch.stack([self.spelling[lang] for lang in language])  # [rows, n]
        return table.gather(1, concepts)

    def pair_inputs(self, query: torch.Tensor, passage: torch.Tensor, language,
                    passage_language=None):
        """[CLS] query [SEP] passage [SEP] as ids and token types. ``language``: one name or one
        per row; the passage's is ``passage_language`` if given (code-switched rows)."""
        q = self.spell(query, language)
        p = self.spell(passage, language if passage_language is None else passage_language)
        rows = query.shape[0]
        ids = torch.cat([torch.full((rows, 1), CLS), q, torch.full((rows, 1), SEP), p,
                         torch.full((rows, 1), SEP)], dim=1)
        types = torch.zeros_like(ids)
        types[:, q.shape[1] + 2:] = 1
        return ids, types

    def mlm_batch(self, rows: int, languages: list[str], weights: list[float],
                  g: torch.Generator):
        """Masked-LM batch of walks split query|passage, each row in a language drawn by
        ``weights`` ("A", "B", or "A|B" for a query in A and its passage in B): (ids, types,
        labels), labels the masked words' indices (id - FIRST_WORD), -100 elsewhere."""
        s = self.settings
        concepts = self.walks(rows, s.query_len + s.passage_len, g)
        pick = torch.multinomial(torch.tensor(weights), rows, replacement=True, generator=g)
        names = [languages[i] for i in pick.tolist()]
        query_langs = [name.partition("|")[0] for name in names]
        passage_langs = [name.partition("|")[2] or name for name in names]
        ids, types = self.pair_inputs(concepts[:, :s.query_len], concepts[:, s.query_len:],
                                      query_langs, passage_langs)
        words = ids >= FIRST_WORD
        masked = (torch.rand(ids.shape, generator=g) < 0.15) & words
        forced = torch.multinomial(words.float(), 1, generator=g)  # at least one per row
        masked.scatter_(1, forced, True)
        labels = torch.where(masked, ids - FIRST_WORD, torch.full_like(ids, -100))
        return ids.masked_fill(masked, MASK), types, labels

    def rerank_batch(self, queries: int, language: str, g: torch.Generator):
        """``queries`` lists of candidates (one continues the query): (ids, types) of
        [queries·candidates, length] and the positive's position per query."""
        s = self.settings
        c = s.candidates
        walk = self.walks(queries, s.query_len + s.passage_len, g)
        query, positive = walk[:, :s.query_len], walk[:, s.query_len:]
        # Negatives start at a concept that does not follow the query's last one.
        not_next = (~self.is_successor[query[:, -1]]).float()  # [queries, n]
        starts = torch.multinomial(not_next, c - 1, replacement=True, generator=g)
        negatives = self.walks(queries * (c - 1), s.passage_len, g, start=starts.reshape(-1))
        passages = torch.cat([positive[:, None], negatives.view(queries, c - 1, -1)], dim=1)
        order = torch.argsort(torch.rand(queries, c, generator=g), dim=1)
        passages = passages.gather(1, order[:, :, None].expand_as(passages))
        label = torch.argmin(order, dim=1)  # where the positive (index 0) went
        ids, types = self.pair_inputs(query.repeat_interleave(c, 0),
                                      passages.reshape(-1, s.passage_len), language)
        return ids, types, label


# ---------------------------------------------------------------------------------------------
# The model: a BERT encoder with a masked-LM head and a cross-encoder scoring head.
# ---------------------------------------------------------------------------------------------
class Encoder(nn.Module):
    """BertModel + BertOnlyMLMHead (for pre-training and the language SFTs) + a scoring head
    on [CLS] (for reranking). One module, so every SFT's layer names agree."""

    def __init__(self, settings: Settings):
        super().__init__()
        config = BertConfig(vocab_size=FIRST_WORD + 2 * settings.n_concepts,
                            hidden_size=settings.hidden, num_hidden_layers=settings.layers,
                            num_attention_heads=settings.heads,
                            intermediate_size=settings.intermediate,
                            max_position_embeddings=2 * (settings.query_len + settings.passage_len),
                            type_vocab_size=2, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0, pad_token_id=PAD)
        self.bert = BertModel(config, add_pooling_layer=False)  # embeds the special tokens
        # The words' embedding table held as a Linear layer over one-hot word indices (column
        # j is word j's vector), so that a sparse fine-tune of Linear layers can adapt it as
        # LT-SFT adapts embeddings: only the columns of the words a text uses get gradients.
        self.words = 2 * settings.n_concepts
        self.word_proj = nn.Linear(self.words, settings.hidden, bias=False)
        self.mlm_head = BertOnlyMLMHead(config)
        del self.mlm_head.predictions.decoder  # tied through word_proj (mlm_logits)
        self.rank_head = nn.Sequential(nn.Linear(settings.hidden, settings.hidden), nn.Tanh(),
                                       nn.Linear(settings.hidden, 1))
        nn.init.zeros_(self.rank_head[0].bias)
        nn.init.zeros_(self.rank_head[2].bias)

    def hidden(self, ids, types):
        dtype = self.rank_head[0].weight.dtype
        words = self.word_proj(F.one_hot((ids - FIRST_WORD).clamp(min=0), self.words).to(dtype))
        special = self.bert.embeddings.word_embeddings(ids.clamp(max=FIRST_WORD - 1))
        words = torch.where((ids >= FIRST_WORD)[..., None], words, special)
        return self.bert(inputs_embeds=words, token_type_ids=types).last_hidden_state

    def mlm_logits(self, ids, types, words: torch.Tensor | None = None):
        """Scores of every word (not the special tokens) at every position; with ``words`` (a
        bool mask of the words), only those compete: the others score -inf."""
        # Output embeddings tied to the input ones: the column that reads a word also writes it.
        predictions = self.mlm_head.predictions
        table = self.word_proj(torch.eye(self.words, dtype=self.rank_head[0].weight.dtype))
        logits = (predictions.transform(self.hidden(ids, types)) @ table.T
                  + predictions.bias[FIRST_WORD:])
        return logits if words is None else logits.masked_fill(~words, float("-inf"))

    def scores(self, ids, types):
        return self.rank_head(self.hidden(ids, types)[:, 0]).squeeze(-1)


def encoder_linears(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.startswith("bert.encoder.")]


def head_linears(model: nn.Module, head: str) -> list[str]:
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.startswith(head + ".")]


# ---------------------------------------------------------------------------------------------
# Training.
# ---------------------------------------------------------------------------------------------
def mlm_loss(model: Encoder, batch, words: torch.Tensor | None = None) -> torch.Tensor:
    ids, types, labels = batch
    logits = model.mlm_logits(ids, types, words)
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))


def rerank_loss(model: Encoder, batch) -> torch.Tensor:
    ids, types, label = batch
    scores = model.scores(ids, types).view(label.shape[0], -1)
    return F.cross_entropy(scores, label)


def train(model: nn.Module, params, steps: int, lr: float, next_batch, loss_fn, *,
          weight_decay: float = 0.0, warmup: int = 0) -> float:
    """AdamW (decoupled weight decay: on an SFT's values it pulls the deltas towards zero);
    with ``warmup``, the rate rises linearly for that many steps, then falls linearly."""
    params = [p for p in params if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    rate = (lambda i: min(1.0, (i + 1) / warmup) * max(0.05, 1 - i / steps)) if warmup else None
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        if rate is not None:
            for group in opt.param_groups:
                group["lr"] = lr * rate(step)
        loss = loss_fn(model, next_batch())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return float(loss.detach())


def sparse_finetune(start: Encoder, layers: dict[str, float], dense_steps: int, steps: int,
                    lr: float, next_batch, loss_fn, *,
                    weight_decay: float = 0.0) -> tuple[Encoder, float]:
    """LT-SFT on a copy of ``start``: the weights of ``layers`` ({name: density}) trained densely
    for ``dense_steps``, the entries that changed most kept, then only those trained for
    ``steps`` from ``start``'s values (with ``weight_decay`` on the deltas). Returns the model
    (ShiraLinear layers) and its last loss."""
    dense = copy.deepcopy(start)
    for p in dense.parameters():
        p.requires_grad_(False)
    weights = [dense.get_submodule(name).weight for name in layers]
    for w in weights:
        w.requires_grad_(True)
    train(dense, weights, dense_steps, lr, next_batch, loss_fn)
    masks = {}
    for density in sorted(set(layers.values())):
        names = [name for name, d in layers.items() if d == density]
        masks.update(change_masks(start, dense, density=density, layers=names))
    model = copy.deepcopy(start)
    sparsify(model, masks)
    mark_only_adapters_trainable(model)
    for module in model.modules():
        if isinstance(module, ShiraLinear):
            # Fixed, so the numbers printed do not depend on this machine's tuning cache.
            module.strategy = "spmm"
    loss = train(model, model.parameters(), steps, lr, next_batch, loss_fn,
                 weight_decay=weight_decay)
    return model, loss


def add_deltas(model: nn.Module, sft: nn.Module) -> nn.Module:
    """A copy of ``model`` with ``sft``'s trained sparse deltas added to its weights."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in sft.named_modules():
            if isinstance(module, ShiraLinear):
                weight = out.get_submodule(name).weight
                weight.view(-1).index_add_(0, module.shira_flat_indices.long(),
                                           module.scale * module.shira_values.to(weight.dtype))
    return out


@torch.no_grad()
def mlm_accuracy(model: Encoder, eval_set, words: torch.Tensor) -> float:
    """Share of masked words predicted right among ``words`` (a language's vocabulary)."""
    ids, types, labels = eval_set
    masked = labels != -100
    predicted = model.mlm_logits(ids, types, words).argmax(-1)
    return float((predicted[masked] == labels[masked]).float().mean())


@torch.no_grad()
def reciprocal_ranks(model: Encoder, eval_set) -> torch.Tensor:
    """1/rank of the positive, per query (its mean is the MRR)."""
    ids, types, label = eval_set
    scores = model.scores(ids, types).view(label.shape[0], -1)
    positive = scores.gather(1, label[:, None])
    others = torch.ones_like(scores, dtype=torch.bool).scatter_(1, label[:, None], False)
    rank = 1 + ((scores >= positive) & others).sum(dim=1)  # ties count against the positive
    return 1.0 / rank.double()


def base_bits(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_bits(model: nn.Module, saved: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == saved.keys() and all(
        now[k].dtype == saved[k].dtype and torch.equal(
            now[k].view(torch.uint8) if now[k].is_floating_point() else now[k],
            saved[k].view(torch.uint8) if saved[k].is_floating_point() else saved[k])
        for k in saved)


# ---------------------------------------------------------------------------------------------
# One run.
# ---------------------------------------------------------------------------------------------
ROWS = (("base", None), ("lang_A alone", "lang_A"), ("task alone", "task"),
        ("lang_B + task (source SFT)", ["lang_B", "task"]),
        ("lang_A + task (composed)", ["lang_A", "task"]))


def run(settings: Settings, seed: int, log=print) -> dict:
    torch.manual_seed(seed)
    world = World(settings, seed)
    g = torch.Generator().manual_seed(seed + 1)
    started = time.perf_counter()

    base = Encoder(settings)
    mixed = settings.mixed_share / 2
    train(base, base.parameters(), settings.pretrain_steps, settings.lr,
          lambda: world.mlm_batch(settings.mlm_batch,
                                  ["B", "A (pre-training)", "A (pre-training)|B",
                                   "B|A (pre-training)"],
                                  [1 - settings.a_share - settings.mixed_share,
                                   settings.a_share, mixed, mixed], g),
          mlm_loss, warmup=settings.pretrain_warmup)
    for p in base.parameters():
        p.requires_grad_(False)

    # A language SFT adapts the word embeddings (word_proj) and nothing else: the encoder,
    # which the task SFT adapts, stays the base's (as in Artetxe et al. 2020: new lexical
    # parameters under a frozen multilingual body). Its masked-LM predicts among the language's
    # own words, so only that language's columns get gradients.
    lang_layers = {"word_proj": settings.lang_density}
    vocabulary = {lang: world.vocabulary(lang) for lang in ("A", "B")}
    lang_sft = {}
    for language in ("A", "B"):
        lang_sft[language], _ = sparse_finetune(
            base, lang_layers, settings.lang_dense_steps, settings.lang_steps, settings.lang_lr,
            lambda: world.mlm_batch(settings.mlm_batch, [language], [1.0], g),
            lambda model, batch: mlm_loss(model, batch, vocabulary[language]),
            weight_decay=settings.lang_weight_decay)

    mlm_eval = {lang: world.mlm_batch(1000, [lang], [1.0], torch.Generator().manual_seed(seed + 2))
                for lang in ("A", "B")}
    mlm = {name: {lang: mlm_accuracy(model, mlm_eval[lang], vocabulary[lang]) for lang in ("A", "B")}
           for name, model in (("base", base), ("lang_A", lang_sft["A"]),
                               ("lang_B", lang_sft["B"]))}

    # The task SFT is trained with the source language's SFT applied to the base.
    source = add_deltas(base, lang_sft["B"])
    task_layers = {name: settings.task_density for name in encoder_linears(base)}
    # The scoring head is new: the task SFT takes all of it.
    task_layers.update({name: 1.0 for name in head_linears(base, "rank_head")})
    task_sft, _ = sparse_finetune(
        source, task_layers, settings.task_dense_steps, settings.task_steps, settings.task_lr,
        lambda: world.rerank_batch(settings.task_batch, "B", g), rerank_loss)

    # Compose on the plain base with the bank.
    bank = AdapterBank(base)
    bank.add_from_model("lang_A", lang_sft["A"])
    bank.add_from_model("lang_B", lang_sft["B"])
    bank.add_from_model("task", task_sft)
    saved = base_bits(base)
    eval_g = torch.Generator().manual_seed(10_000 + seed)
    eval_sets = {lang: world.rerank_batch(settings.eval_queries, lang, eval_g)
                 for lang in ("A", "B")}
    results, ranks_a = {}, {}
    for label, active in ROWS:
        bank.activate(active) if active is not None else bank.deactivate()
        ranks = {lang: reciprocal_ranks(base, eval_sets[lang]) for lang in ("A", "B")}
        results[label] = {lang: float(r.mean()) for lang, r in ranks.items()}
        ranks_a[label] = ranks["A"]
    bank.deactivate()
    # Composition against the better SFT alone on A, paired over the same queries.
    rival = max(("lang_A alone", "task alone"), key=lambda label: results[label]["A"])
    diff = ranks_a["lang_A + task (composed)"] - ranks_a[rival]
    margin = {"rival": rival, "margin": float(diff.mean()),
              "standard_error": float(diff.std() / diff.numel() ** 0.5)}
    restored = same_bits(base, saved)
    if not restored:
        raise AssertionError("deactivate() did not restore the base model bit for bit")
    entries = {name: sum(d.nnz for d, _ in bank.deltas(name).values()) for name in bank.names}
    log(f"seed {seed}: trained in {time.perf_counter() - started:.1f} s; entries per SFT: "
        + ", ".join(f"{k} {v}" for k, v in entries.items()))
    log(f"seed {seed}: masked-LM accuracy on A / B: " + "; ".join(
        f"{k} {v['A']:.3f} / {v['B']:.3f}" for k, v in mlm.items()))
    return {"mrr": results, "mlm_accuracy": mlm, "base_restored": restored, "entries": entries,
            "composition_margin": margin}


def print_table(runs: dict[int, dict], log=print) -> None:
    seeds = list(runs)
    head = f"{'MRR (8 candidates, random ~0.34)':34s}" + "".join(f"  A s{s:<4d}" for s in seeds)
    log(head + "  A mean   B mean")
    for label, _ in ROWS:
        a = [runs[s]["mrr"][label]["A"] for s in seeds]
        b = [runs[s]["mrr"][label]["B"] for s in seeds]
        log(f"{label:34s}" + "".join(f"  {x:6.3f}" for x in a)
            + f"  {statistics.mean(a):6.3f}   {statistics.mean(b):6.3f}")


def verdict(runs: dict[int, dict]) -> tuple[bool, str]:
    """Does composition beat both SFTs alone on language A in every seed, by more than twice
    the standard error of the paired per-query difference (so not by evaluation noise)?"""
    detail = []
    ok = True
    for seed, r in runs.items():
        m = r["composition_margin"]
        ok = ok and m["margin"] > 2 * m["standard_error"]
        detail.append(f"seed {seed}: {m['margin']:+.3f} ± {m['standard_error']:.3f} over "
                      f"{m['rival']}")
    if ok:
        return True, ("composition (lang_A + task) beats each SFT alone on language A in every "
                      f"seed, by more than 2 standard errors (MRR {'; '.join(detail)})")
    return False, ("composition (lang_A + task) does NOT clearly beat each SFT alone on language "
                   f"A in every seed (MRR {'; '.join(detail)}; a win needs more than 2 standard "
                   "errors)")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter training (the test's mode)")
    parser.add_argument("--seed", type=int, default=None, help="one seed (default: 0 1 2)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="several seeds")
    args = parser.parse_args(argv)
    if args.seed is not None and args.seeds is not None:
        parser.error("give --seed or --seeds, not both")
    seeds = [args.seed] if args.seed is not None else (args.seeds or [0, 1, 2])
    settings = QUICK if args.quick else FULL
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # layers this small run faster on one thread than on several
    try:
        runs = {seed: run(settings, seed) for seed in seeds}
    finally:
        torch.set_num_threads(threads)
    print_table(runs)
    ok, text = verdict(runs)
    print(f"verdict: {text}")
    return {"settings": dataclasses.asdict(settings), "runs": runs, "composition_wins": ok,
            "verdict": text}


if __name__ == "__main__":
    main(sys.argv[1:])

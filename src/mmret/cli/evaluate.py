"""``mmret eval retrieval | zeroshot | ir``: measure any encoder the way the field reports it.

The commands only load data, call :mod:`mmret.evaluation` and hand the results to
:mod:`mmret.evaluation.reports`; every one prints a table and can write ``--json``,
``--markdown`` and ``--plot`` files.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import typer

from mmret.cache.embeddings import embed_items
from mmret.cli.memory import (
    FUSION_HELP,
    MEMORY_HELP,
    MEMORY_K_HELP,
    SEARCH_HELP,
    open_refiner,
)
from mmret.cli.output import ReflowedHelp, console, friendly_errors, print_skips, status
from mmret.cli.query_bank import QUERY_BANK_HELP, resolve_query_bank
from mmret.encoders import DEFAULT_MODEL, Encoder, load_encoder
from mmret.errors import InputError
from mmret.evaluation import reports, runs
from mmret.evaluation.classification import (
    DEFAULT_TEMPLATES,
    read_class_folders,
)
from mmret.evaluation.datasets import load_pairs
from mmret.evaluation.documents import (
    CORPUS_FILES,
    QRELS_FILE,
    QUERIES_FILE,
    write_document_task,
)
from mmret.evaluation.ir import ir_metrics, read_qrels
from mmret.evaluation.reports import MetricTable, percent
from mmret.evaluation.reranked import (
    RerankedReport,
    reranking_order,
)
from mmret.evaluation.retrieval import (
    RetrievalReport,
    recall_curve,
)
from mmret.heads.cross_encoder import SideTokens
from mmret.ingest.report import SkipReport
from mmret.ingest.sources import read_items
from mmret.items import Item
from mmret.late_interaction import similarity
from mmret.reranker import FirstStage, first_stage_name, load_reranker
from mmret.search_steps import query_modality

eval_app = typer.Typer(
    cls=ReflowedHelp,
    help="Measure quality: image-text retrieval, zero-shot classification, multimodal IR.",
    no_args_is_help=True,
)

MODEL_HELP = (
    "Encoder spec: starter-v4 (default), starter-v3, starter, starter:DIR, ensemble:DIR, "
    "hf:NAME, open_clip:MODEL/TAG, hash:DIM."
)
HEAD_HELP = "Alignment head folder from `mmret train align` (same as --model starter:DIR)."
JSON_HELP = "Write the numbers as JSON here."
MARKDOWN_HELP = "Write the tables as Markdown here."
CACHE_HELP = "Cache folder for embeddings (default ~/.cache/mmret or $MMRET_CACHE)."
RERANK_HELP = (
    "Also score after the cross-encoder reranks the first stage's top N (0: off); "
    "repeat for several N."
)
RERANKER_HELP = "Reranker folder from `mmret train rerank` (default: the shipped one)."


def resolve_model(model: str, head: Path | None) -> str:
    """The encoder spec for ``--model`` and ``--head`` (a head only goes with the starter)."""
    if head is None:
        return model
    if model not in ("starter", DEFAULT_MODEL):
        raise InputError(
            f"--head is an alignment head for the starter model; it cannot be combined with "
            f"--model {model!r} (give --head DIR alone, or --model starter:DIR)"
        )
    if not head.is_dir():
        raise InputError(f"--head {head}: no such folder")
    return f"starter:{head}"


def load(spec: str) -> tuple[Encoder, float]:
    started = time.perf_counter()
    with status(f"Loading encoder {spec}..."):
        encoder = load_encoder(spec)
    return encoder, time.perf_counter() - started


def publish(
    tables: Sequence[MetricTable],
    record: dict[str, Any],
    heading: str,
    json_out: Path | None,
    markdown_out: Path | None,
) -> None:
    for table in tables:
        console.print(table.to_rich())
        for note in table.notes:
            console.print(note, highlight=False)
    if json_out is not None:
        reports.write_json(json_out, record)
    if markdown_out is not None:
        reports.write_markdown(markdown_out, heading, tables)


def check_outputs(plot: Path | None) -> None:
    if plot is not None:
        reports.check_plot_path(plot)


def timings(**seconds: float) -> str:
    """``time: encoder 0.1 s, ...``; model weights load lazily, within "embeddings"."""
    return "time: " + ", ".join(f"{name} {value:.1f} s" for name, value in seconds.items())


@eval_app.command("retrieval")
@friendly_errors
def retrieval(
    manifest: Path = typer.Argument(
        ...,
        help="Test set: a JSONL/CSV/Parquet manifest of images with captions, a Karpathy "
        "split file (dataset_flickr30k.json, dataset_coco.json) or a COCO captions_*.json.",
    ),
    model: str = typer.Option(DEFAULT_MODEL, help=MODEL_HELP),
    head: Path | None = typer.Option(None, help=HEAD_HELP),
    split: str | None = typer.Option(
        None, help="Karpathy split: train, restval, val or test (default test)."
    ),
    images: Path | None = typer.Option(
        None, help="Image folder of a Karpathy (default: the file's folder) or COCO file."
    ),
    folds: int = typer.Option(
        1, min=1, help="Average over this many image folds (5 on COCO 5k test: COCO 1k)."
    ),
    json_out: Path | None = typer.Option(None, "--json", help=JSON_HELP),
    markdown_out: Path | None = typer.Option(None, "--markdown", help=MARKDOWN_HELP),
    plot: Path | None = typer.Option(None, help="Write Recall@K curves (K=1..50) as PNG here."),
    cache_dir: Path | None = typer.Option(None, help=CACHE_HELP),
    memory: Path | None = typer.Option(None, "--memory", help=MEMORY_HELP),
    fusion: str = typer.Option("transformer", "--fusion", help=FUSION_HELP),
    memory_k: int = typer.Option(10, "--memory-k", min=1, help=MEMORY_K_HELP),
    memory_search: str = typer.Option("uni", "--memory-search", help=SEARCH_HELP),
    rerank: list[int] = typer.Option([], "--rerank", min=1, help=RERANK_HELP),
    reranker: Path | None = typer.Option(None, help=RERANKER_HELP),
    query_bank: str = typer.Option("auto", "--query-bank", help=QUERY_BANK_HELP),
) -> None:
    """Image-text retrieval: Recall@1/5/10 both ways, RSUM and median ranks.

    Every image and caption is embedded (and cached). Text-to-image: each caption ranks all
    images, its own is the hit. Image-to-text: each image ranks all captions, any of its own
    is a hit. Recalls are percentages; ties count in the query's favour. Scores are normalised
    with the model's query bank as `mmret search` normalises them (--query-bank off: cosines).

    With --rerank N the first stage's top N are rescored by the cross-encoder from stored
    token features (a query whose hit is not among them keeps its first-stage rank); ms per
    query are the reranking's own (features read and scored one query at a time).
    """
    started = time.perf_counter()
    check_outputs(plot)
    spec = resolve_model(model, head)
    report = SkipReport()
    pairs = load_pairs(manifest, split=split, images=images, report=report)
    refiner = open_refiner(memory, fusion, memory_k, memory_search)
    encoder, load_s = load(spec)
    run = runs.evaluate_retrieval(
        pairs,
        encoder,
        refiner=refiner,
        bank=resolve_query_bank(query_bank, encoder.spec, refined=refiner is not None),
        folds=folds,
        rerank=rerank,
        reranker=reranker,
        cache_dir=cache_dir,
        report=report,
        show_progress=True,
    )
    print_skips(report)
    seconds = time.perf_counter() - started
    metrics, reranked, label = run.metrics, run.reranked, run.model
    record = {**run.record(), "seconds": round(seconds, 3)}
    per_fold = f" per fold, mean of {folds} folds" if folds > 1 else ""
    title = f"{manifest.name}: {metrics.n_images} images, {metrics.n_texts} texts{per_fold}"
    rows = (
        ("text→image", metrics.text_to_image, metrics.median_rank_text_to_image),
        ("image→text", metrics.image_to_text, metrics.median_rank_image_to_text),
    )
    table = MetricTable(
        f"{title} ({label})",
        ("direction", "R@1", "R@5", "R@10", "median rank"),
        tuple((name, *(percent(v) for v in r.values()), f"{m:g}") for name, r, m in rows),
        (
            f"RSUM {metrics.rsum:.1f}",
            timings(encoder=load_s, **run.seconds, total=seconds),
        ),
    )
    tables = [table, reranked_table(metrics, reranked)] if reranked else [table]
    publish(tables, record, "Image-text retrieval", json_out, markdown_out)
    if plot is not None:
        curves = {
            "text→image": recall_curve(metrics.ranks_text_to_image),
            "image→text": recall_curve(metrics.ranks_image_to_text),
        }
        reports.plot_recall_curves(plot, curves, f"{title}\n{label}, RSUM {metrics.rsum:.1f}")


@eval_app.command("zeroshot")
@friendly_errors
def zeroshot(
    folder: Path = typer.Argument(
        ..., help="One sub-folder of images per class; the class name is the folder's, _ as space."
    ),
    model: str = typer.Option(DEFAULT_MODEL, help=MODEL_HELP),
    head: Path | None = typer.Option(None, help=HEAD_HELP),
    templates: list[str] = typer.Option(
        [],
        "--templates",
        "-t",
        help="Prompt template with {} for the class name; repeat for an ensemble "
        "(default: " + " | ".join(DEFAULT_TEMPLATES) + ").",
    ),
    json_out: Path | None = typer.Option(None, "--json", help=JSON_HELP),
    markdown_out: Path | None = typer.Option(None, "--markdown", help=MARKDOWN_HELP),
    plot: Path | None = typer.Option(None, help="Write the confusion matrix as PNG here."),
    cache_dir: Path | None = typer.Option(None, help=CACHE_HELP),
    memory: Path | None = typer.Option(None, "--memory", help=MEMORY_HELP),
    fusion: str = typer.Option("transformer", "--fusion", help=FUSION_HELP),
    memory_k: int = typer.Option(10, "--memory-k", min=1, help=MEMORY_K_HELP),
    memory_search: str = typer.Option("uni", "--memory-search", help=SEARCH_HELP),
) -> None:
    """Zero-shot classification: top-1, top-5 and per-class accuracy from class-name prompts.

    Each class is the renormalised mean of its prompts' unit embeddings (one per template);
    each image takes the class it is most similar to. Nothing is trained.
    """
    started = time.perf_counter()
    check_outputs(plot)
    spec = resolve_model(model, head)
    report = SkipReport()
    data = read_class_folders(folder, report)
    refiner = open_refiner(memory, fusion, memory_k, memory_search)
    encoder, load_s = load(spec)
    run = runs.evaluate_zeroshot(
        data,
        encoder,
        refiner=refiner,
        templates=templates,
        cache_dir=cache_dir,
        report=report,
        show_progress=True,
        source=str(folder),
    )
    print_skips(report)
    seconds = time.perf_counter() - started
    metrics, label, prompts = run.metrics, run.model, run.templates
    record = run.record()
    top_k = min(5, len(data.classes))
    summary = MetricTable(
        f"{folder.name}: {metrics.n} images, {len(data.classes)} classes ({label})",
        ("metric", "value"),
        (
            ("top-1 accuracy", percent(metrics.top1)),
            (f"top-{top_k} accuracy", percent(metrics.top5)),
            (
                "mean per-class accuracy",
                percent(float(np.nanmean(list(metrics.per_class.values())))),
            ),
        ),
        (
            f"{len(prompts)} template(s): " + " | ".join(prompts),
            timings(encoder=load_s, **run.seconds, total=seconds),
        ),
    )
    counts = metrics.confusion.sum(axis=1)
    off_diagonal = metrics.confusion - np.diag(np.diag(metrics.confusion))
    per_class = MetricTable(
        "Per class",
        ("class", "images", "accuracy", "most confused with"),
        tuple(
            (
                name,
                str(counts[i]),
                percent(metrics.per_class[name]),
                data.classes[int(off_diagonal[i].argmax())] if off_diagonal[i].any() else "-",
            )
            for i, name in enumerate(data.classes)
        ),
    )
    publish([summary, per_class], record, "Zero-shot classification", json_out, markdown_out)
    if plot is not None:
        title = f"{folder.name}: top-1 {metrics.top1:.1f}% ({label})"
        reports.plot_confusion(plot, metrics.confusion, data.classes, title)


@eval_app.command("ir")
@friendly_errors
def ir(
    queries: Path = typer.Argument(..., help="Queries: a manifest of texts, images or both."),
    corpus: Path = typer.Argument(..., help="Documents: a manifest (or folder) of items."),
    qrels: Path = typer.Argument(
        ..., help="Judgements: TREC 'qid 0 docid rel' or 3 columns 'qid docid rel' (BEIR)."
    ),
    model: str = typer.Option(DEFAULT_MODEL, help=MODEL_HELP),
    head: Path | None = typer.Option(None, help=HEAD_HELP),
    json_out: Path | None = typer.Option(None, "--json", help=JSON_HELP),
    markdown_out: Path | None = typer.Option(None, "--markdown", help=MARKDOWN_HELP),
    plot: Path | None = typer.Option(None, help="Write the Recall@K curve (K=1..50) as PNG here."),
    cache_dir: Path | None = typer.Option(None, help=CACHE_HELP),
    memory: Path | None = typer.Option(None, "--memory", help=MEMORY_HELP),
    fusion: str = typer.Option("transformer", "--fusion", help=FUSION_HELP),
    memory_k: int = typer.Option(10, "--memory-k", min=1, help=MEMORY_K_HELP),
    memory_search: str = typer.Option("uni", "--memory-search", help=SEARCH_HELP),
    rerank: int = typer.Option(
        0,
        "--rerank",
        min=0,
        help="Rescore each query's top N documents with the cross-encoder reranker (0: off).",
    ),
    reranker: Path | None = typer.Option(None, help=RERANKER_HELP),
    query_bank: str = typer.Option("auto", "--query-bank", help=QUERY_BANK_HELP),
) -> None:
    """Multimodal retrieval (M-BEIR / M2KR style): R@1/5/10, MRR@10 and nDCG@10, in percent.

    Queries and documents may have a text, an image or both (embedded as the encoder combines
    them). R@K counts queries with a relevant document in the top K; nDCG uses the graded
    relevance with a log2 discount against the ideal ordering of the judged documents.

    Text and image queries' scores are normalised with the model's query bank as `mmret
    search` normalises them (--query-bank off: plain scores).

    With --rerank N each query's top N are reordered by the cross-encoder (token features of
    the queries and of the documents that are candidates are computed once per run).
    """
    started = time.perf_counter()
    check_outputs(plot)
    spec = resolve_model(model, head)
    report = SkipReport()
    judgements = read_qrels(qrels)
    query_items = list(read_items(queries).read(report))
    doc_items = list(read_items(corpus).read(report))
    if not query_items or not doc_items:
        raise InputError("need at least one query and one document")
    refiner = open_refiner(memory, fusion, memory_k, memory_search)
    encoder, load_s = load(spec)
    label = runs.model_label(encoder.spec, refiner)
    encoding = time.perf_counter()
    if refiner is not None:  # refined per modality, then combined: not from the plain cache
        encoder = refiner.wrap(encoder)
        query_vectors = encoder.encode(query_items, show_progress=True)
        doc_vectors = encoder.encode(doc_items, show_progress=True)
    else:
        query_vectors = embed_items(
            encoder.for_queries(), query_items, cache_dir=cache_dir, show_progress=True
        )
        doc_vectors = embed_items(encoder, doc_items, cache_dir=cache_dir, show_progress=True)
    encode_s = time.perf_counter() - encoding
    query_ids = [item.id for item in query_items]
    bank = resolve_query_bank(query_bank, encoder.spec, refined=refiner is not None)
    discounts = None
    if bank is not None:
        label += " + query bank"
        by_modality = {m: bank.discount(doc_vectors, m) for m in ("text", "image")}
        discounts = [by_modality.get(query_modality(item) or "") for item in query_items]
    reorder = None
    if rerank:
        cross = load_reranker(reranker)
        features: dict[tuple[str, int], SideTokens] = {}

        def side(kind: str, items: Sequence[Item], row: int) -> SideTokens:
            if (kind, row) not in features:
                features[kind, row] = cross.features([items[row]])
            return features[kind, row]

        first_stage_model = first_stage_name(
            encoder.spec, refined=refiner is not None, query_bank=bank is not None
        )

        def first_stage(query: int, documents: np.ndarray) -> np.ndarray:
            scores: np.ndarray = similarity(
                query_vectors[query : query + 1], doc_vectors[documents], encoder.token_dim
            )[0]
            discount = discounts[query] if discounts is not None else None
            return scores if discount is None else scores - discount[documents]

        reorder = reranking_order(
            lambda q, c, s: cross.score(q, c, FirstStage(first_stage_model, s)),
            lambda q: side("query", query_items, q),
            lambda d: side("doc", doc_items, d),
            first_stage,
            rerank,
        )
        label += f" + rerank top {rerank}"
    metrics = ir_metrics(
        query_vectors,
        doc_vectors,
        query_ids,
        [d.id for d in doc_items],
        judgements,
        token_dim=encoder.token_dim,
        reorder=reorder,
        depth=rerank,
        discounts=discounts,
    )
    unknown = len(set(judgements) - set(query_ids))
    if unknown:
        report.skip(f"{qrels.name}: {unknown} judged query id(s) not among the queries")
    print_skips(report)
    seconds = time.perf_counter() - started
    scores = {**metrics.recall, "MRR@10": metrics.mrr, "nDCG@10": metrics.ndcg}
    record = {
        **runs.rounded_percentages(scores),
        "n_queries": metrics.n_queries,
        "n_docs": metrics.n_docs,
        "model": label,
        **({"memory": refiner.record()} if refiner else {}),
        "seconds": round(seconds, 3),
    }
    title = f"{queries.name} → {corpus.name}: {metrics.n_queries} queries, {metrics.n_docs} docs"
    table = MetricTable(
        f"{title} ({label})",
        ("queries", *scores),
        ((queries.stem, *(percent(value) for value in scores.values())),),
        (timings(encoder=load_s, embeddings=encode_s, total=seconds),),
    )
    publish([table], record, "Multimodal retrieval", json_out, markdown_out)
    if plot is not None:
        curves = {queries.stem: recall_curve(metrics.ranks)}
        reports.plot_recall_curves(plot, curves, f"{title}\n{label}")


@eval_app.command("doc-task")
@friendly_errors
def doc_task(
    manifest: Path = typer.Argument(
        ..., help="A manifest (or Karpathy/COCO file) of images with several captions each."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the queries, corpora, qrels."),
    split: str | None = typer.Option(None, help="Karpathy split (default test)."),
    images: Path | None = typer.Option(None, help="Image folder of a Karpathy or COCO file."),
) -> None:
    """Build the multimodal-document task as `mmret eval ir` inputs.

    Each image with its first caption is a document; its other captions are the queries
    (text to image+text, as in M2KR). The same documents are also written reduced to their
    image and to their text, to show whether a model uses both halves.
    """
    report = SkipReport()
    pairs = load_pairs(manifest, split=split, images=images, report=report)
    counts = write_document_task(pairs, out)
    print_skips(report)
    console.print(
        f"wrote {counts['queries']} queries and {counts['documents']} documents to {out}",
        highlight=False,
    )
    for corpus in CORPUS_FILES:
        console.print(
            f"mmret eval ir {out / QUERIES_FILE} {out / corpus} {out / QRELS_FILE} --model MODEL",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )


def reranked_table(first: RetrievalReport, reranked: Sequence[RerankedReport]) -> MetricTable:
    """The first stage and each reranked depth: recalls both ways and ms per query."""

    def row(label: str, report: RetrievalReport, t2i_ms: str, i2t_ms: str) -> tuple[str, ...]:
        t2i, i2t = report.text_to_image.values(), report.image_to_text.values()
        return (label, *map(percent, t2i), t2i_ms, *map(percent, i2t), i2t_ms, f"{report.rsum:.1f}")

    rows = [row("first stage", first, "-", "-")]
    for r in reranked:
        t2i_ms, i2t_ms = (
            f"{r.ms_per_query_text_to_image:.1f}",
            f"{r.ms_per_query_image_to_text:.1f}",
        )
        rows.append(row(f"+ rerank top {r.n}", r.report, t2i_ms, i2t_ms))
    columns = ("", "t2i R@1", "R@5", "R@10", "ms/q", "i2t R@1", "R@5", "R@10", "ms/q", "RSUM")
    weight = reranked[0].first_stage_weight if reranked else 0.0
    title = "Reranked by the cross-encoder" + (
        f" + {weight:g} x the first stage's score (calibrated)"
        if weight
        else " alone (no first-stage weight calibrated for this model)"
    )
    return MetricTable(title, columns, tuple(rows))

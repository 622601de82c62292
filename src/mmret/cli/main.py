"""``mmret index | search | serve | info | remove | demo``, and the other commands' panels."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import typer
from rich.markup import escape

from mmret.cli.ensemble import train as train_ensemble
from mmret.cli.evaluate import eval_app
from mmret.cli.generate import ask, caption, context, eval_caption, eval_fewshot
from mmret.cli.maintain import check, recluster, repair
from mmret.cli.memory import (
    FUSION_HELP,
    MEMORY_HELP,
    MEMORY_K_HELP,
    SEARCH_HELP,
    memory_app,
    open_refiner,
)
from mmret.cli.memory import train as train_reco
from mmret.cli.output import (
    ReflowedHelp,
    console,
    errors,
    friendly_errors,
    print_json,
    print_skips,
    results_table,
    status,
)
from mmret.cli.query_bank import QUERY_BANK_HELP, query_bank_option
from mmret.cli.query_bank import train as train_query_bank
from mmret.cli.serve import serve
from mmret.cli.train import train_app
from mmret.cli.train_caption import train as train_caption
from mmret.cli.train_rerank import calibrate as calibrate_rerank
from mmret.cli.train_rerank import train as train_rerank
from mmret.encoders import DEFAULT_MODEL
from mmret.engine import Retriever
from mmret.errors import InputError
from mmret.index.filters import parse_filter
from mmret.index.manifest import MANIFEST_FILE
from mmret.ingest.report import SkipReport
from mmret.ingest.sources import read_items
from mmret.items import Query
from mmret.reranker import load_reranker
from mmret.scaleout.ray_encode import add_with_ray
from mmret.scaleout.shards import DEFAULT_SHARD_SIZE, check_shard_size

RERANK_HELP = (
    "Rescore the first stage's top N (at least --k) with the cross-encoder reranker, plus the "
    "first stage's score where the reranker is calibrated for the index's model (0: off); the "
    "index must store token features (mmret index --token-features)."
)
RERANKER_HELP = "Reranker folder from `mmret train rerank` (default: the shipped one)."

app = typer.Typer(
    cls=ReflowedHelp,
    help="mmret: index and search images, texts and image+text items.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
# Commands are listed in the order a user meets them, in panels: finding things first, then
# generation, training and evaluation, and the maintenance of an index last.
SEARCH_PANEL = "Index and search"
GENERATE_PANEL = "Retrieval for generation"
TRAIN_PANEL = "Train and evaluate"
MAINTAIN_PANEL = "Maintain an index"
train_app.command("reco")(train_reco)
train_app.command("rerank")(train_rerank)
train_app.command("rerank-calibrate")(calibrate_rerank)
train_app.command("query-bank")(train_query_bank)
train_app.command("ensemble")(train_ensemble)
train_app.command("caption")(train_caption)


def parse_options(pairs: list[str]) -> dict[str, object]:
    """``["uri=http://host:19530", "nprobe=64"]`` -> ``{"uri": "http://...", "nprobe": 64}``."""
    options: dict[str, object] = {}
    for pair in pairs:
        key, equals, text = pair.partition("=")
        if not equals or not key:
            raise InputError(f"--backend-option {pair!r}: expected KEY=VALUE")
        try:
            options[key] = json.loads(text)
        except ValueError:
            options[key] = text  # a plain string, such as a URI
    return options


@app.command(rich_help_panel=SEARCH_PANEL)
@friendly_errors
def index(
    source: Path = typer.Argument(
        ..., help="A folder of images, or a .jsonl/.csv/.parquet manifest."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Index folder (created, or added to)."),
    model: str | None = typer.Option(
        None,
        help=f"Encoder spec: starter, starter:DIR, hf:NAME, open_clip:MODEL/TAG. Default: the "
        f"index's own encoder, or {DEFAULT_MODEL} for a new index.",
    ),
    backend: str = typer.Option(
        "auto",
        help="auto, exact, faiss, ivfpq, milvus, maxsim or plaid (auto: exact below 100k "
        "items, faiss above, ivfpq once the float32 vectors pass 4 GiB; for multi-vector "
        "models maxsim below 10k items, plaid above; milvus takes either kind of model).",
    ),
    backend_option: list[str] = typer.Option(
        [],
        "--backend-option",
        help="KEY=VALUE option of a new index's backend, repeatable; values read as JSON "
        "where they parse (e.g. uri=http://localhost:19530 for milvus, nprobe=64 for ivfpq).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary."),
    wait: float = typer.Option(10.0, help="Seconds to wait if another writer has OUT open."),
    memory: Path | None = typer.Option(None, "--memory", help=MEMORY_HELP),
    fusion: str = typer.Option("transformer", "--fusion", help=FUSION_HELP),
    memory_k: int = typer.Option(10, "--memory-k", min=1, help=MEMORY_K_HELP),
    memory_search: str = typer.Option("uni", "--memory-search", help=SEARCH_HELP),
    token_features: bool = typer.Option(
        False,
        "--token-features",
        help="Store the token features the reranker reads beside a new index, so searches "
        "can use --rerank (a second pass of the towers; about 50 KB per image).",
    ),
    reranker: Path | None = typer.Option(None, help=RERANKER_HELP),
    ray: str | None = typer.Option(
        None,
        "--ray",
        help="Encode on a Ray cluster: its address (ray://HOST:10001, or auto for the cluster "
        "this machine is in), or local to start one here. The source is encoded in shards "
        "staged beside OUT; run again after an interruption and finished shards are skipped.",
    ),
    ray_workers: int | None = typer.Option(
        None,
        "--ray-workers",
        min=1,
        help="Ray workers, each with one encoder (default: one per CPU of the cluster).",
    ),
    shards: Path | None = typer.Option(
        None, "--shards", help="Staging folder of --ray's shards (default: OUT.ray-shards)."
    ),
    shard_size: int = typer.Option(
        DEFAULT_SHARD_SIZE, "--shard-size", help="Items per --ray shard (a multiple of 256)."
    ),
) -> None:
    """Index a folder or manifest into OUT; an existing index gets the new items added."""
    report = SkipReport()
    items = []
    if ray is None:
        with status("Reading source..."):
            items = list(read_items(source).read(report))
    else:
        check_shard_size(shard_size)
        read_items(source)  # a missing source fails before anything is created
        if memory is not None or token_features or reranker is not None:
            raise InputError("--ray cannot be combined with --memory or --token-features")
    refiner = open_refiner(memory, fusion, memory_k, memory_search)
    if (out / MANIFEST_FILE).exists():
        retriever = Retriever.open(out, wait=wait, refiner=refiner)
        if model is not None and model != retriever.manifest.encoder:
            raise InputError(f"{out} uses encoder {retriever.manifest.encoder!r}, not {model!r}")
    else:
        model = model or DEFAULT_MODEL
        spec = load_reranker(reranker).spec if token_features or reranker else None
        with status(f"Loading encoder {model}..."):
            retriever = Retriever.create(
                out,
                model=model,
                backend=backend,
                backend_options=parse_options(backend_option),
                refiner=refiner,
                token_features=spec,
            )
    with retriever:
        if ray is None:
            result = retriever.add(items, report=report, show_progress=True, total=len(items))
        else:
            result = add_with_ray(
                retriever,
                source,
                address=None if ray == "local" else ray,
                workers=ray_workers,
                staging=shards,
                shard_size=shard_size,
                show_progress=True,
            )
            report = result.skipped
        summary = {
            "added": result.added,
            "skipped": report.skipped,
            "reasons": report.reasons,
            **retriever.info(),
        }
    if as_json:
        print_json(summary)
        return
    print_skips(report)
    total = summary["items"]
    console.print(
        f"[green]indexed {result.added} items[/] into {escape(str(out))} ({total} in total)"
    )


@app.command(rich_help_panel=SEARCH_PANEL)
@friendly_errors
def search(
    index_dir: Path = typer.Argument(..., metavar="DIR", help="Index folder."),
    text: str | None = typer.Argument(None, help="Text query."),
    image: Path | None = typer.Option(None, "--image", "-i", help="Image query (with TEXT: both)."),
    k: int = typer.Option(10, "--k", "-k", min=1, help="Number of results."),
    filters: list[str] = typer.Option([], "--filter", "-f", help="key=value, key=a,b, key>=n ..."),
    as_json: bool = typer.Option(False, "--json", help="Print results as JSON."),
    memory: Path | None = typer.Option(None, "--memory", help=MEMORY_HELP),
    fusion: str = typer.Option("transformer", "--fusion", help=FUSION_HELP),
    memory_k: int = typer.Option(10, "--memory-k", min=1, help=MEMORY_K_HELP),
    memory_search: str = typer.Option("uni", "--memory-search", help=SEARCH_HELP),
    rerank: int = typer.Option(0, "--rerank", min=0, help=RERANK_HELP),
    reranker: Path | None = typer.Option(None, help=RERANKER_HELP),
    query_bank: str = typer.Option("auto", "--query-bank", help=QUERY_BANK_HELP),
) -> None:
    """Search an index with a text, an image, or both.

    An index built with --memory refines its queries with the same memory (its recorded path
    unless --memory is given; another memory is refused).
    """
    if text is None and image is None:
        raise InputError("give a text query, --image PATH, or both")
    query = Query(text=text, image=image)
    refiner = open_refiner(memory, fusion, memory_k, memory_search)
    with Retriever.open(index_dir, readonly=True, refiner=refiner) as retriever:
        model = load_reranker(reranker) if rerank and reranker else None
        hits = retriever.search(
            [query],
            k=k,
            filter=parse_filter(filters) or None,
            rerank=rerank,
            reranker=model,
            query_bank=query_bank_option(query_bank),
        )[0]
    if as_json:
        print_json({"results": [hit.to_dict() for hit in hits]})
        return
    label = " + ".join(part for part in (f"image {image}" if image else "", text or "") if part)
    console.print(results_table(f"{label}", hits))


app.command(rich_help_panel=SEARCH_PANEL)(serve)


@app.command(rich_help_panel=SEARCH_PANEL)
@friendly_errors
def info(
    index_dir: Path = typer.Argument(..., metavar="DIR", help="Index folder."),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
) -> None:
    """Describe an index: item count, encoder, backend, format version."""
    with Retriever.open(index_dir, readonly=True) as retriever:
        details = retriever.info()
    if as_json:
        print_json(details)
        return
    for key, value in details.items():
        console.print(f"[bold]{key:>15}[/]  {value}")


@app.command(rich_help_panel=SEARCH_PANEL)
@friendly_errors
def remove(
    index_dir: Path = typer.Argument(..., metavar="DIR", help="Index folder."),
    ids: list[str] = typer.Argument(..., help="Ids of the items to remove."),
    wait: float = typer.Option(10.0, help="Seconds to wait if another writer has DIR open."),
) -> None:
    """Remove items by id."""
    with Retriever.open(index_dir, wait=wait) as retriever:
        removed = retriever.remove(ids)
    console.print(f"removed {removed} of {len(ids)} ids")


@app.command(rich_help_panel=SEARCH_PANEL)
@friendly_errors
def demo(
    workdir: Path | None = typer.Option(
        None, help="Where to keep the photos and index (default: a temp dir)."
    ),
    k: int = typer.Option(3, "--k", "-k", min=1, help="Results per query."),
) -> None:
    """Index public-domain photos from scikit-image and search them with text and images."""
    from mmret.demo import run_demo

    with tempfile.TemporaryDirectory(prefix="mmret-demo-") as scratch:
        run = run_demo(workdir or Path(scratch), k=k, show_progress=True)
        for label, hits in run.queries:
            console.print(results_table(label, hits))
    errors.print("[dim]demo index: " + (str(run.folder) if workdir else "(temporary)") + "[/]")


app.command(rich_help_panel=GENERATE_PANEL)(context)
app.command(rich_help_panel=GENERATE_PANEL)(ask)
app.command(rich_help_panel=GENERATE_PANEL)(caption)
app.add_typer(train_app, name="train", rich_help_panel=TRAIN_PANEL)
app.add_typer(eval_app, name="eval", rich_help_panel=TRAIN_PANEL)
app.add_typer(memory_app, name="memory", rich_help_panel=TRAIN_PANEL)
app.command(rich_help_panel=MAINTAIN_PANEL)(check)
app.command(rich_help_panel=MAINTAIN_PANEL)(repair)
app.command(rich_help_panel=MAINTAIN_PANEL)(recluster)
eval_app.command("caption")(eval_caption)
eval_app.command("fewshot")(eval_fewshot)

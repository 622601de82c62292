"""``mmret context``, ``mmret ask`` and ``mmret caption``: retrieval for generation."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import typer
from rich.markup import escape

from mmret.cache.embeddings import embed_images
from mmret.cli.evaluate import CACHE_HELP, JSON_HELP, MARKDOWN_HELP, MODEL_HELP, load, publish
from mmret.cli.output import console, friendly_errors, print_json, print_skips, status
from mmret.encoders import DEFAULT_MODEL
from mmret.engine import Retriever
from mmret.errors import InputError
from mmret.evaluation.captioning import caption_metrics
from mmret.evaluation.classification import class_embeddings, read_class_folders
from mmret.evaluation.reports import MetricTable, percent
from mmret.generation.captioner import BEAM, DOCUMENT_VIEWS, DocumentView, RetrievalCaptioner
from mmret.generation.chat import ChatEndpoint
from mmret.generation.consensus import CONSENSUS_POLICY, Caption, consensus_captions
from mmret.generation.context import Context, retrieve_context, to_chat, to_markdown
from mmret.generation.fewshot import FewShotOptions, few_shot_probabilities, split_shots
from mmret.generation.policy import MODALITIES, ContextPolicy, Modality
from mmret.index.filters import parse_filter
from mmret.ingest.pairs import read_pairs
from mmret.ingest.report import SkipReport
from mmret.items import Query

FORMATS = ("json", "md", "chat")
_DEFAULT = ContextPolicy()

# One definition of each policy option, shared by the commands that select context.
K = typer.Option(_DEFAULT.k, "--k", "-k", min=1, help="Documents to select.")
CANDIDATES = typer.Option(
    _DEFAULT.candidates, "--candidates", min=1, help="First-stage hits considered."
)
MODALITY = typer.Option(
    _DEFAULT.modality,
    "--modality",
    help="any, prefer (image+text documents get --modality-bonus) or require (only those).",
)
BONUS = typer.Option(_DEFAULT.modality_bonus, "--modality-bonus", help="See --modality.")
DIVERSITY_HELP = "Maximal marginal relevance weight: 0 ranks by relevance only, 1 by novelty only."
DIVERSITY = typer.Option(_DEFAULT.diversity, "--diversity", min=0.0, max=1.0, help=DIVERSITY_HELP)
DUPLICATE = typer.Option(
    _DEFAULT.duplicate_threshold,
    "--duplicate-threshold",
    help="Drop documents at least this similar to the query or to one already chosen.",
)
TEMPERATURE = typer.Option(
    _DEFAULT.temperature,
    "--temperature",
    min=0.0,
    help="Sample the set: Gumbel noise of this scale on relevance (0: deterministic).",
)
SEED = typer.Option(_DEFAULT.seed, "--seed", help="Seed of the sampling.")
FILTERS = typer.Option([], "--filter", "-f", help="key=value, key=a,b, key>=n ...")
IMAGE = typer.Option(None, "--image", "-i", help="Query image (with TEXT: both).")


def _policy(
    k: int,
    candidates: int,
    modality: str,
    bonus: float,
    diversity: float,
    duplicate: float,
    temperature: float,
    seed: int,
) -> ContextPolicy:
    return ContextPolicy(
        k, max(candidates, k), _modality(modality), bonus, diversity, duplicate, temperature, seed
    )


def _query(text: str | None, image: Path | None) -> Query:
    if text is None and image is None:
        raise InputError("give a text query, --image PATH, or both")
    if image is not None and not image.is_file():
        raise InputError(f"{image}: no such image file")
    return Query(text=text, image=image)


def _select(index_dir: Path, query: Query, policy: ContextPolicy, filters: list[str]) -> Context:
    """The context ``policy`` selects for ``query`` from the index at ``index_dir``."""
    with Retriever.open(index_dir, readonly=True) as retriever:
        return retrieve_context(retriever, query, policy, filter=parse_filter(filters) or None)


@friendly_errors
def context(
    index_dir: Path = typer.Argument(..., metavar="DIR", help="Index folder (the memory)."),
    text: str | None = typer.Argument(None, help="Text query."),
    image: Path | None = IMAGE,
    output_format: str = typer.Option("md", "--format", help="json, md or chat."),
    image_side: int = typer.Option(
        512, "--image-side", min=0, help="chat: longest image side sent (0: the file as is)."
    ),
    k: int = K,
    candidates: int = CANDIDATES,
    modality: str = MODALITY,
    modality_bonus: float = BONUS,
    diversity: float = DIVERSITY,
    duplicate_threshold: float = DUPLICATE,
    temperature: float = TEMPERATURE,
    seed: int = SEED,
    filters: list[str] = FILTERS,
) -> None:
    """Select relevant, multimodal, diverse documents for a query and print them as context
    for a generator: JSON, Markdown, or OpenAI-compatible chat messages."""
    if output_format not in FORMATS:
        raise InputError(f"--format must be one of {', '.join(FORMATS)}, got {output_format!r}")
    policy = _policy(
        k, candidates, modality, modality_bonus, diversity, duplicate_threshold, temperature, seed
    )
    chosen = _select(index_dir, _query(text, image), policy, filters)
    if output_format == "json":
        print_json(chosen.to_dict())
    elif output_format == "chat":
        print_json(to_chat(chosen, image_side=image_side))
    else:
        print(to_markdown(chosen))


@friendly_errors
def ask(
    index_dir: Path = typer.Argument(..., metavar="DIR", help="Index folder (the memory)."),
    question: str = typer.Argument(..., help="The question (also the text query)."),
    image: Path | None = IMAGE,
    base_url: str | None = typer.Option(
        None, "--base-url", help="Chat endpoint (default: $OPENAI_BASE_URL, else OpenAI's)."
    ),
    chat_model: str | None = typer.Option(
        None, "--chat-model", help="Model name (default: $MMRET_CHAT_MODEL)."
    ),
    api_key: str | None = typer.Option(
        None, "--api-key", help="API key (default: $OPENAI_API_KEY; none for a local server)."
    ),
    image_side: int = typer.Option(512, "--image-side", min=0, help="Longest image side sent."),
    show_context: bool = typer.Option(False, "--show-context", help="Print the context too."),
    k: int = K,
    candidates: int = CANDIDATES,
    modality: str = MODALITY,
    modality_bonus: float = BONUS,
    diversity: float = DIVERSITY,
    duplicate_threshold: float = DUPLICATE,
    temperature: float = TEMPERATURE,
    seed: int = SEED,
    filters: list[str] = FILTERS,
) -> None:
    """Answer a question with a chat model (any OpenAI-compatible endpoint), sending the
    context that mmret selects from the index."""
    endpoint = ChatEndpoint.from_options(base_url, chat_model, api_key)
    policy = _policy(
        k, candidates, modality, modality_bonus, diversity, duplicate_threshold, temperature, seed
    )
    chosen = _select(index_dir, _query(question, image), policy, filters)
    if show_context:
        console.print(escape(to_markdown(chosen)), highlight=False)
    print(endpoint.complete(to_chat(chosen, question, image_side=image_side)))


CAPTIONER = typer.Option(
    "decoder",
    "--model",
    help="decoder (the retrieval-augmented decoder shipped with mmret), a decoder folder from "
    "`mmret train caption`, or consensus (the neighbours' consensus caption, no training).",
)
CAPTION_K = typer.Option(
    None,
    "--k",
    "-k",
    min=1,
    help="Neighbours read by consensus (default 10; a decoder reads "
    "the number it was trained with).",
)
BEAM_OPTION = typer.Option(BEAM, "--beam", min=1, help="A decoder's beam width (1: greedy).")
CAPTION_DIVERSITY = typer.Option(
    None, "--diversity", min=0.0, max=1.0, help=f"{DIVERSITY_HELP} Default: the model's."
)


def _captions(
    retriever: Retriever,
    images: list[Path],
    model: str,
    k: int | None,
    diversity: float | None,
    *,
    modality: str | None = None,
    view: DocumentView = "both",
    query_vectors: np.ndarray | None = None,
    beam: int = BEAM,
) -> tuple[list[Caption], str]:
    """Captions of ``images`` from ``retriever``'s memory by ``model`` and what made them."""
    if model == "consensus":
        policy = replace(CONSENSUS_POLICY, k=k or CONSENSUS_POLICY.k)
        policy = replace(policy, candidates=max(policy.candidates, policy.k))
        policy = replace(policy, diversity=diversity or 0.0)
        made = consensus_captions(retriever, images, policy, show_progress=len(images) > 1)
        return made, f"consensus k={policy.k} diversity={policy.diversity}"
    captioner = RetrievalCaptioner.load(None if model == "decoder" else Path(model))
    policy = captioner.policy
    if k is not None and k != captioner.model.config.documents:
        raise InputError(
            f"the decoder reads the {captioner.model.config.documents} documents it was "
            f"trained with; --k {k} applies to --model consensus"
        )
    if diversity is not None:
        policy = replace(policy, diversity=diversity)
    if modality is not None:
        policy = replace(policy, modality=_modality(modality))
    made = captioner.caption(
        images,
        retriever,
        policy=policy,
        view=view,
        query_vectors=query_vectors,
        beam=beam,
        show_progress=len(images) > 1,
    )
    name = "the shipped decoder" if model == "decoder" else f"decoder {model}"
    if not captioner.uses_retrieval:
        return made, f"{name} without retrieval beam={beam}"
    return made, (
        f"{name} k={policy.k} modality={policy.modality} "
        f"diversity={policy.diversity} read={view} beam={beam}"
    )


def _modality(text: str) -> Modality:
    for modality in MODALITIES:
        if modality == text:
            return modality
    raise InputError(f"--modality must be one of {', '.join(MODALITIES)}, got {text!r}")


@friendly_errors
def caption(
    images: list[Path] = typer.Argument(..., help="Images to caption."),
    memory: Path = typer.Option(
        ..., "--memory", help="An index of captioned images (e.g. `mmret index train.jsonl`)."
    ),
    model: str = CAPTIONER,
    k: int | None = CAPTION_K,
    diversity: float | None = CAPTION_DIVERSITY,
    beam: int = BEAM_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Print captions and sources as JSON."),
) -> None:
    """Caption images from a memory of captioned images: by default the shipped decoder writes
    a caption from the image and the documents retrieved for it."""
    for path in images:
        if not path.is_file():
            raise InputError(f"{path}: no such image file")
    with Retriever.open(memory, readonly=True) as retriever:
        made, _ = _captions(retriever, list(images), model, k, diversity, beam=beam)
    if as_json:
        rows = [
            {"image": str(path), "caption": c.text, "neighbours": c.context.ids}
            for path, c in zip(images, made, strict=True)
        ]
        print_json(rows)
        return
    for path, made_caption in zip(images, made, strict=True):
        text = escape(made_caption.text) or "[dim](no captioned neighbour in the memory)[/]"
        console.print(f"[bold]{escape(str(path))}[/]: {text}")


#: Not in ``eval caption``'s JSON record: the note is printed, per-image scores go to --captions.
SKIPPED = ("note", "per_image_cider")


@friendly_errors
def eval_caption(
    manifest: Path = typer.Argument(..., help="Images with reference captions (a manifest)."),
    memory: Path = typer.Option(
        ..., "--memory", help="An index of captioned images that does not hold these images."
    ),
    model: str = CAPTIONER,
    k: int | None = CAPTION_K,
    diversity: float | None = CAPTION_DIVERSITY,
    modality: str | None = typer.Option(
        None, "--modality", help="A decoder's policy modality (any, prefer, require)."
    ),
    read: str = typer.Option(
        "both",
        "--read",
        help="What a decoder reads of each document: both, text (its caption only) or vector "
        "(its embedding only).",
    ),
    beam: int = BEAM_OPTION,
    limit: int | None = typer.Option(None, "--limit", min=1, help="Only the first N images."),
    meteor: bool = typer.Option(True, help="Also METEOR (about 20 s of Java start-up)."),
    json_out: Path | None = typer.Option(None, "--json", help=JSON_HELP),
    markdown_out: Path | None = typer.Option(None, "--markdown", help=MARKDOWN_HELP),
    captions_out: Path | None = typer.Option(
        None,
        "--captions",
        help="Write each image's caption, CIDEr and neighbours here (JSON Lines).",
    ),
    cache_dir: Path | None = typer.Option(None, help=CACHE_HELP),
) -> None:
    """Caption quality (BLEU-4, METEOR, CIDEr with the COCO caption evaluation code) of the
    captions a model writes from a memory."""
    views = {view: view for view in DOCUMENT_VIEWS}
    if read not in views:
        raise InputError(f"--read must be one of {', '.join(DOCUMENT_VIEWS)}, got {read!r}")
    started = time.perf_counter()
    report = SkipReport()
    pairs = read_pairs(manifest, report)
    count = len(pairs.images) if limit is None else min(limit, len(pairs.images))
    with Retriever.open(memory, readonly=True) as retriever:
        vectors, decoded = embed_images(
            retriever.encoder,
            pairs.images[:count],
            cache_dir=cache_dir,
            report=report,
            show_progress=True,
        )
        keep = np.flatnonzero(decoded)
        ids = [pairs.image_ids[i] for i in keep]
        made, captioner = _captions(
            retriever,
            [pairs.images[i] for i in keep],
            model,
            k,
            diversity,
            modality=modality,
            view=views[read],
            query_vectors=vectors[keep],
            beam=beam,
        )
        label = retriever.manifest.encoder
    references: dict[str, list[str]] = {image_id: [] for image_id in ids}
    for text, owner in zip(pairs.texts, pairs.text_image.tolist(), strict=True):
        if pairs.image_ids[owner] in references:
            references[pairs.image_ids[owner]].append(text)
    captions = {image_id: c.text for image_id, c in zip(ids, made, strict=True)}
    with status("Scoring captions (COCO caption evaluation)..."):
        scores = caption_metrics(references, captions, meteor=meteor)
    if captions_out is not None:
        cider = scores["per_image_cider"]
        rows = (
            {"id": i, "caption": c.text, "CIDEr": round(cider[i], 4), "neighbours": c.context.ids}
            for i, c in zip(ids, made, strict=True)
        )
        captions_out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print_skips(report)
    seconds = time.perf_counter() - started
    shown = {name: scores[name] for name in ("BLEU-1", "BLEU-4", "METEOR", "CIDEr")}
    record = {
        **{
            name: v if v is None else round(v, 4)
            for name, v in scores.items()
            if name not in SKIPPED
        },
        "captioner": captioner,
        "memory": str(memory),
        "model": label,
        "seconds": round(seconds, 3),
    }
    table = MetricTable(
        f"{manifest.name}: {len(ids)} images, memory {memory.name} ({label})",
        ("captioner", *shown),
        ((captioner, *("-" if v is None else f"{v:.1f}" for v in shown.values())),),
        (*([scores["note"]] if "note" in scores else []), f"time: {seconds:.1f} s"),
    )
    publish([table], record, "Captioning", json_out, markdown_out)


@friendly_errors
def eval_fewshot(
    folder: Path = typer.Argument(..., help="One sub-folder of images per class."),
    model: str = typer.Option(DEFAULT_MODEL, help=MODEL_HELP),
    shots: list[int] = typer.Option(
        [1, 5, 16], "--shots", help="Labelled examples per class (repeat for several)."
    ),
    k: int = typer.Option(FewShotOptions.k, "--k", "-k", min=1, help="Neighbours that vote."),
    weight: float | None = typer.Option(
        None,
        "--weight",
        min=0.0,
        max=1.0,
        help="Share of the neighbours' vote (0: zero-shot, 1: nearest neighbours only; "
        "default n/(n+1) for n shots per class).",
    ),
    seeds: int = typer.Option(3, "--seeds", min=1, help="Random draws of the shots, averaged."),
    json_out: Path | None = typer.Option(None, "--json", help=JSON_HELP),
    markdown_out: Path | None = typer.Option(None, "--markdown", help=MARKDOWN_HELP),
    cache_dir: Path | None = typer.Option(None, help=CACHE_HELP),
) -> None:
    """Retrieval-augmented few-shot classification: each image's nearest labelled examples
    (N per class, drawn from the folder) vote with its zero-shot prediction; the rest of the
    folder is classified. Top-1 in percent, mean over --seeds draws."""
    started = time.perf_counter()
    options = FewShotOptions(k, weight)
    report = SkipReport()
    data = read_class_folders(folder, report)
    encoder, _ = load(model)
    image, ok = embed_images(
        encoder, data.paths, cache_dir=cache_dir, report=report, show_progress=True
    )
    image, labels = image[ok], data.labels[ok]
    scores = image @ class_embeddings(encoder, data.classes).T
    rows, record_rows = [], []
    for count in shots:
        accuracy: dict[str, list[float]] = {"zero-shot": [], "neighbours": [], "mixed": []}
        for seed in range(seeds):
            picked, rest = split_shots(labels, count, seed)
            for name, share in (("zero-shot", 0.0), ("neighbours", 1.0), ("mixed", weight)):
                probabilities = few_shot_probabilities(
                    scores[rest],
                    image[rest],
                    image[picked],
                    labels[picked],
                    replace(options, weight=share),
                )
                hits = probabilities.argmax(axis=1) == labels[rest]
                accuracy[name].append(100.0 * float(hits.mean()))
        means = {name: float(np.mean(values)) for name, values in accuracy.items()}
        rows.append((str(count), *(percent(value) for value in means.values())))
        record_rows.append({"shots": count, **{n: round(v, 4) for n, v in means.items()}})
    print_skips(report)
    seconds = time.perf_counter() - started
    mixing = "w=n/(n+1)" if weight is None else f"w={weight}"
    table = MetricTable(
        f"{folder.name}: {len(labels)} images, {len(data.classes)} classes ({encoder.spec})",
        ("shots per class", "zero-shot top-1", "neighbours top-1", f"mixed ({mixing}) top-1"),
        tuple(rows),
        (f"k={k}, mean of {seeds} draws of the shots; time: {seconds:.1f} s",),
    )
    record = {
        "rows": record_rows,
        "k": k,
        "weight": weight,
        "seeds": seeds,
        "model": encoder.spec,
        "seconds": round(seconds, 3),
    }
    publish([table], record, "Few-shot classification", json_out, markdown_out)

"""Caption quality with the standard COCO caption evaluation code (``pycocoevalcap``).

Captions and references are tokenised by its PTB tokenizer (Stanford CoreNLP, run with Java),
then scored with BLEU-1..4, METEOR (Java; left out with a note when it cannot run) and CIDEr
(the CIDEr-D of the COCO server). Scores are reported x100, as papers print them.
"""

from __future__ import annotations

import contextlib
import io
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

from mmret.errors import InputError, MmretError

INSTALL_HINT = "pip install 'mmret[caption]' (and Java on the PATH)"


def caption_metrics(
    references: Mapping[str, Sequence[str]], captions: Mapping[str, str], *, meteor: bool = True
) -> dict[str, Any]:
    """Corpus-level scores of ``captions`` (id -> caption) against ``references`` (id -> the
    reference captions), over the ids of ``captions``. METEOR (``None`` when skipped) costs
    about 20 s of Java start-up."""
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.meteor.meteor import Meteor
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError:
        raise MmretError(f"caption evaluation needs pycocoevalcap: {INSTALL_HINT}") from None
    if shutil.which("java") is None:
        raise MmretError(f"caption evaluation tokenises with Java: {INSTALL_HINT}")
    missing = [key for key in captions if not references.get(key)]
    if missing:
        raise InputError(f"no reference captions for {len(missing)} ids, e.g. {missing[0]!r}")
    if not captions:
        raise InputError("no captions to evaluate")
    with contextlib.redirect_stdout(io.StringIO()):  # the scorers print as they go
        # One Java start for both sides: keys "r..." hold references, "c..." captions.
        tokens = PTBTokenizer().tokenize(
            {
                **{f"r{key}": [{"caption": ref} for ref in references[key]] for key in captions},
                **{f"c{key}": [{"caption": text or "."}] for key, text in captions.items()},
            }
        )
        gts = {key: tokens[f"r{key}"] for key in captions}
        res = {key: tokens[f"c{key}"] for key in captions}
        bleu, _ = Bleu(4).compute_score(gts, res)
        cider, per_image = Cider().compute_score(gts, res)
        scores: dict[str, Any] = {f"BLEU-{n}": 100 * float(bleu[n - 1]) for n in range(1, 5)}
        scores["CIDEr"] = 100 * float(cider)
        scores["METEOR"] = None
        if meteor:
            try:
                scores["METEOR"] = 100 * _meteor(Meteor(), gts, res)
            except (OSError, ValueError, RuntimeError) as error:
                scores["note"] = f"METEOR did not run: {error}"
    scores["per_image_cider"] = {
        key: 100 * float(value) for key, value in zip(gts, per_image, strict=True)
    }
    scores["n_images"] = len(captions)
    return scores


def _meteor(scorer: Any, gts: dict[str, list[str]], res: dict[str, list[str]]) -> float:
    """METEOR from the scorer's Java process, which is then ended with all its pipes (the
    scorer itself leaves two open)."""
    try:
        return float(scorer.compute_score(gts, res)[0])
    finally:
        process = scorer.meteor_p
        process.kill()
        process.wait()
        for pipe in (process.stdin, process.stdout, process.stderr):
            pipe.close()

"""Evaluation: retrieval probes (passkey, needle) as depth x length heatmaps, loss by position,
and a side-by-side report of teacher and students. See docs/eval.md."""

from stages.evaluate.models import LoadedModel, load_model, split_model
from stages.evaluate.retrieval import score_probes
from stages.evaluate.run import run_eval
from stages.evaluate.tasks import Haystack, Probe, build_probes

__all__ = ["LoadedModel", "load_model", "split_model", "score_probes", "run_eval", "Haystack", "Probe",
           "build_probes"]

"""`gptoss publish` (the publishing stage): push a run's adapter, merged model or GGUFs to the Hugging Face Hub.

What is published, and from which record:

* ``adapter``: ``models/<run>/adapter/`` (PEFT files + tokenizer) described by
  ``models/<run>/training_info.json`` and ``train_config.json``.
* ``merged``: the folder named by ``merged`` in ``exports/<run>/manifest.json`` (bf16 safetensors,
  config, tokenizer; not merge's own ``merge_info.json``).
* ``gguf``: every ``gguf`` artifact of the manifest plus its Modelfile, laid out at the repo root
  so that the Hub serves each quant by tag (``hf.co/ORG/NAME:Q4_K_M``), with ``template`` and
  ``params`` files taken from the Modelfile so ``ollama run hf.co/...`` speaks Harmony.

Every file is checked against the records (size, sha256) before anything touches the network,
and the model card (``README.md``, built with huggingface_hub's ModelCard) reports what the
records say. Upload is one ``HfApi.create_commit``: LFS/Xet uploads first (retried on transient
errors by huggingface_hub), then one commit naming the run. An interrupted upload is resumed by
re-running the same command: files whose content is already on the Hub are not sent again.

The token comes only from ``HF_TOKEN`` or the stored login (``hf auth login``); it is never
printed, written, or uploaded: every file is scanned for it before upload.

The stage's modules: ``records`` (what it reads from the run and the export), ``plan`` (every file and
check, before the network), ``card`` (the model card) and ``upload`` (the Hub commit, published.json).
"""

from gptoss.publishing.card import build_card_text, card_metadata
from gptoss.publishing.plan import PublishPlan, plan_publish
from gptoss.publishing.records import PUBLISHED, WHATS, ExportManifest, PublishError, TrainingRecord, gguf_quant_tag
from gptoss.publishing.upload import publish

__all__ = ["PUBLISHED", "WHATS", "ExportManifest", "PublishError", "PublishPlan", "TrainingRecord", "build_card_text",
           "card_metadata", "gguf_quant_tag", "plan_publish", "publish"]

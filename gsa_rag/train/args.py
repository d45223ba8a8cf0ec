"""`TrainArgs`: the settings of one training run, apart from the loop so that the command line
can build its options (and answer --help and usage errors) without importing torch."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrainArgs:
    """Everything a run needs; saved with every checkpoint and in the adapter manifest."""

    stage: str  # "cpt" or "sft"
    output: str  # the adapter directory this run writes (refused if it already holds one)
    data: list[str] = field(default_factory=list)
    base: str | None = None  # model id/path/.gguf; None: the default model
    init_adapter: str | None = None  # continue from an earlier stage's adapter; "default": the bundled one
    gist: dict = field(default_factory=dict)  # GistConfig fields
    full: bool = False  # full fine-tuning instead of LoRA (writes a whole model)
    lora_r: int = 16
    lora_alpha: int = 32
    lr: float = 2e-4
    steps: int = 100
    batch_size: int = 8  # per process, per micro-step
    grad_accum: int = 1
    warmup: int = 10
    seed: int = 0
    block_tokens: int = 1024  # cpt: raw tokens per packed block
    tail_tokens: int = 128  # cpt: raw tail that recalls by selection
    max_blocks: int | None = None  # cpt: cap on packed blocks
    max_prompt_tokens: int = 4096  # sft: drop passages beyond this
    reuse: bool = False  # sft: the KV-reuse (gist memory) layout: independent passages + link tokens
    num_links: int | None = None  # sft --reuse: link tokens after each passage; None: all (as GistMemory)
    selection_loss: float = 0.0  # sft: weight of the auxiliary gold-chunk selection loss; 0: none
    selection_rows: str = "last"  # sft --selection-loss: query rows it scores: "last" prompt token or whole "tail"
    selection_target: str = "any"  # sft --selection-loss: gold mass as a whole ("any") or on every gold chunk ("all")
    gradient_checkpointing: bool = False
    save_every: int = 0  # steps between resumable checkpoints; 0: only at the end
    resume: bool = False
    log_every: int = 10
    max_minutes: float = 0.0  # stop early (and save) once this much time is spent; 0: no limit

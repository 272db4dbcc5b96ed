"""base_config(): every key with its default and a one-line comment. Configs are diffs of it.

A key whose value is one of a fixed set of names has its names defined by the module that reads
it (MODES and ALGORITHMS here: main.py and the loop read them); validate.enums() lists them all and
validate.check_enums is the one place they are checked, before any work.
"""

from __future__ import annotations

import ml_collections

MODES = ("rl", "sft", "eval", "plan", "coldstart")  # config.mode
ALGORITHMS = ("grpo", "tapo", "opsd")  # config.algorithm


def base_config() -> ml_collections.ConfigDict:
  """The full config tree; experiment files in configs/ change a few keys."""
  c = ml_collections.ConfigDict()
  # rl | sft | eval | plan (memory per device, abstract shapes only: tapo_jax.plan) |
  # coldstart (build the cold-start SFT set: tapo_jax.coldstart)
  c.mode = "rl"
  c.algorithm = "tapo"  # grpo | tapo | opsd (on-policy self-distillation: tapo_jax/opsd)
  c.seed = 0  # one seed for params init, sampling, DCS pairing and data order
  c.workdir = ""  # checkpoints, metrics.jsonl, TensorBoard events; --workdir overrides
  c.distributed = False  # call jax.distributed.initialize() first (multi-host TPU slices)
  # Explicit coordinates for jax.distributed.initialize (GPU hosts, local multi-process runs);
  # empty/-1 leave them to JAX's auto-detection (TPU VM metadata, SLURM, Open MPI).
  c.distributed_coordinator = ""  # HOST:PORT of process 0's coordinator service
  c.distributed_num_processes = -1  # processes in the job
  c.distributed_process_id = -1  # this process's index in [0, num_processes)
  c.distributed_heartbeat_s = 30  # a process silent this long is dead: the others stop too
  c.distributed_timeout_s = 300.0  # every process must have joined by then, else all stop

  c.model = ml_collections.ConfigDict()
  c.model.path = ""  # local Hugging Face directory (config.json + *.safetensors + tokenizer)
  c.model.toy = ""  # name of a built-in toy model (tapo_jax.toy) used when path is empty
  c.model.dtype = "float32"  # compute dtype: float32 | bfloat16
  c.model.param_dtype = "float32"  # master-weight dtype
  c.model.remat = False  # rematerialize each decoder block in the backward pass
  # "" (XLA: materializes [B, heads, T, T] scores) | cudnn (GPU) | blockwise (any backend) |
  # splash (Pallas TPU kernel): tapo_jax/models/attention.py
  c.model.attention_impl = ""

  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))  # -1 fills devices

  c.data = ml_collections.ConfigDict()
  c.data.train_path = ""  # jsonl/json/parquet training problems
  c.data.layout = "auto"  # auto | dapo | deepscaler | math | aime | hmmt | sft
  c.data.prompt_template = (
    "{problem}\n\nPlease reason step by step, and put your final answer within \\boxed{{}}."
  )
  c.data.use_chat_template = True  # apply the tokenizer's chat template when it has one
  c.data.max_prompt_tokens = 512  # longer prompts are an error at load time
  c.data.shuffle = True
  # (low, high): before RL, keep the problems whose pass rate under the initial policy (rollout.n
  # samples each, cached in WORKDIR/pass_rates.json) lies in [low, high]; () keeps all. Paper: the
  # "zone of proximal development" (1/8, 7/8).
  c.data.pass_rate_window = ()

  c.rollout = ml_collections.ConfigDict()
  c.rollout.n = 8  # K: samples per query
  c.rollout.batch_queries = 8  # Q: queries per RL step
  c.rollout.max_new_tokens = 1024
  c.rollout.temperature = 1.0
  c.rollout.top_p = 1.0
  c.rollout.top_k = 0  # 0 = off
  c.rollout.slots = 64  # engine's max concurrent decodes
  c.rollout.prefill_buckets = (64, 128, 256, 512, 1024, 2048)
  # dynamic sampling: while fewer than Q of a step's groups have mixed rewards, sample Q more
  # queries, up to resample_rounds extra rounds (tapo_jax/train/rollouts.py)
  c.rollout.dynamic = False
  c.rollout.resample_rounds = 2
  # 1: one-step-off overlap, the rollouts of step t+1 are sampled with step t's params while step
  # t updates (pair with loss.rollout_is); 0: sample, then update
  c.rollout.async_steps = 0
  # > 0: the first N devices sample and the rest train (on mesh); 0: samplers and trainer share
  # the devices. One process only (jax.distributed cannot copy between disjoint device sets).
  c.rollout.sampler_devices = 0
  # The samplers' decode layout (tapo_jax/sampling/engine.py): their devices as data x tensor,
  # weights split over tensor and replicated over data, resharded from the trainer's once per
  # step. 0 = the largest divisor of the kv heads that divides the devices and fits one host.
  c.rollout.decode_tensor = 0
  c.rollout.weight_dtype = "bfloat16"  # the samplers' weight copy: bfloat16 | float32

  c.reward = ml_collections.ConfigDict()
  c.reward.timeout_s = 5.0  # hard per-item kill in the verifier pool
  c.reward.workers = 2
  # where a response gives its answer: boxed (the last \boxed{...}) | answer_line (a last line
  # "Answer: ...", for DAPO's own prompt template); no "last number" fallback either way
  c.reward.extract = "boxed"

  c.tapo = ml_collections.ConfigDict()
  c.tapo.n_pos = 2  # DCS: min correct rollouts for an eligible query
  c.tapo.n_neg = 4  # DCS: min incorrect rollouts
  c.tapo.m_max = 4  # DCS: max constructions per eligible query
  # policy (the paper's: the policy rewrites y- given y+; needs a cold-started model) |
  # divergence (rule-based: cut y- at its first step that differs from y+; no generation)
  c.tapo.construction = "divergence"
  c.tapo.synthesis_template = ""  # "" = the built-in template (tapo_jax.tapo.construct)
  # tokens the policy may write for one construction (analysis + copied prefix + correction +
  # continuation); 0 = rollout.max_new_tokens + 1024. Less than rollout.max_new_tokens is an
  # error: a copied y- alone can be that long.
  c.tapo.synthesis_max_new_tokens = 0
  # policy: the reconstruction's longest common prefix with y- (on their text, cut at y-'s own
  # token boundaries) is taken from y-'s tokens. A construction keeping no token of y-, or fewer
  # than min_anchor x |y-| tokens, is a "full reconstruction" and is dropped.
  c.tapo.anchor = True  # False: the ablation that trains the whole rewrite as inserted text
  c.tapo.min_anchor = 0.0
  c.tapo.diagnosis_template = "Wait, this step is wrong. Let me redo it.\n"
  c.tapo.keep_failed = True  # keep constructions that end wrong, with reward 0
  c.tapo.ref_scope = "batch"  # batch | query: the group G_ref is normalized over
  # group (the paper's: normalize within G_ref) | orig (r - mean of the source query's G_orig).
  # divergence constructions all end in y+'s answer: G_ref has no variance, so they need orig.
  # joint: the ablation without DAE (a construction joins its query's G_orig, normalized together)
  c.tapo.ref_baseline = "orig"
  c.tapo.lam = 1.0  # λ: weight of the constructed-trajectory loss
  c.tapo.ots = True  # OOD token suppression on constructed rows
  c.tapo.ots_min = 0.01
  c.tapo.ots_max = 10.0
  c.tapo.max_len = 2048  # padded row length of the trainer's batch (prompt + response)

  c.loss = ml_collections.ConfigDict()
  c.loss.eps_low = 0.2
  c.loss.eps_high = 0.28
  c.loss.adv_eps = 1e-6  # ε in (r - mean) / (std + ε)
  c.loss.aggregation = "token-mean"  # token-mean | seq-mean-token-mean | seq-mean-token-sum-norm
  # rollout correction of the sampler/trainer gap u = pi_old / pi_sampler (tapo_jax/tapo/loss.py):
  # off | token-tis (weigh each sampled token by min(u, cap)) | seq-mask (drop a row whose
  # geometric-mean u leaves band). Constructions: on their anchored prefix only.
  c.loss.rollout_is = "off"
  c.loss.rollout_is_cap = 2.0
  c.loss.rollout_is_band = (0.5, 2.0)
  c.loss.vocab_chunk = 4096  # logprob/entropy computed this many vocabulary entries at a time
  c.loss.filter_zero_variance = True  # drop groups whose rewards are all equal
  c.loss.mask_truncated = False  # zero the loss of responses that hit max_new_tokens
  c.loss.overlong_penalty = 0.0  # soft penalty factor for long responses (0 = off)
  c.loss.overlong_buffer = 256  # tokens before max_new_tokens where the penalty ramps up

  # algorithm=opsd (tapo_jax/opsd; choices and sources: docs/recipe.md "OPSD"): the policy, shown
  # a privileged solution in its prompt and given no gradient, teaches itself without it, token by
  # token over the full vocabulary on its own rollouts.
  c.opsd = ml_collections.ConfigDict()
  # group: a correct rollout of the row's group other than itself, else the problem's reference
  # solution (a `solution` field), else the row is not distilled | reference: the reference only
  # (the OPSD paper's teacher)
  c.opsd.solution_source = "group"
  # β of D = β KL(p_T || M) + (1-β) KL(p_S || M), M = β p_T + (1-β) p_S: 0 = forward KL(p_T || p_S),
  # 1 = reverse KL(p_S || p_T); 0.5 = JSD (the OPSD scripts' --beta 0.5)
  c.opsd.beta = 0.5
  c.opsd.grpo_coef = 0.0  # weight of an added GRPO loss on the same rollouts (OPSD: none, 0)
  # the teacher's user message, fields {problem} {solution}, then wrapped in data.prompt_template;
  # "" = the built-in one (tapo_jax/opsd/teacher.py)
  c.opsd.teacher_template = ""
  c.opsd.max_solution_tokens = 0  # solution tokens shown (cut); 0 = rollout.max_new_tokens
  # teacher row length (template + problem + solution + response); 0 = what those need, measured
  # with the tokenizer at start-up
  c.opsd.max_len = 0

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-6
  c.optim.warmup_steps = 10
  c.optim.weight_decay = 0.01
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.grad_clip = 1.0
  c.optim.max_update_ratio = 1.0  # skip an update larger than this x ||params|| (0 = off)
  c.optim.micro_batch = 8  # rows per gradient-accumulation micro-batch
  # tokens per micro-batch: rows of tapo.max_len (sft: sft.max_len) tokens, each packed with
  # whole sequences (tapo_jax/minibatches.py); 0 = micro_batch rows
  c.optim.micro_batch_tokens = 0
  c.optim.ppo_epochs = 1  # passes over each rollout batch
  c.optim.minibatches = 1  # optimizer steps per rollout batch and epoch

  c.train = ml_collections.ConfigDict()
  c.train.steps = 100
  c.train.checkpoint_every = 50
  c.train.keep_checkpoints = 2
  c.train.log_every = 1
  c.train.eval_every = 0  # 0 = no periodic eval during RL
  c.train.eval_at_start = False  # also evaluate before the first step (logged as step 0)
  c.train.dump_rollouts_every = 0  # write every N-th step's rollouts to WORKDIR/rollouts/ (0 = off)
  c.train.curves = True  # draw WORKDIR/curves.png from metrics.jsonl at the end (RL and SFT)

  c.sft = ml_collections.ConfigDict()
  c.sft.path = ""  # jsonl of {prompt, response} or {messages}
  c.sft.batch_size = 8
  c.sft.max_len = 2048
  c.sft.epochs = 1
  c.sft.steps = 0  # optimizer steps; 0 = epochs over the data
  c.sft.stop_at = 0  # stop (checkpoint, export) after this many of those steps; 0 = run them all

  # mode=coldstart: rollout.n rollouts of the policy (model.path) per problem of data.train_path,
  # DCS pairs (tapo.n_pos / n_neg / m_max), a teacher rewrites each y- with the synthesis template
  # (tapo.synthesis_template, tapo.synthesis_max_new_tokens); rewrites that parse, anchor to y-
  # (tapo.min_anchor) and reach the gold become SFT rows, with plain solutions. Paper: ~45k rows,
  # 30k constructions + 15k solutions (configs/qwen7b_coldstart_data.py).
  c.coldstart = ml_collections.ConfigDict()
  c.coldstart.output = ""  # the SFT jsonl (mode=sft's sft.path); "" = WORKDIR/coldstart.jsonl
  c.coldstart.constructions = 30000  # target rows: synthesis prompt -> <analysis><reconstruction>
  c.coldstart.solutions = 15000  # target rows: the problem's RL prompt -> a correct rollout
  c.coldstart.solutions_per_problem = 1  # distinct correct (untruncated) rollouts kept per problem
  c.coldstart.chunk_problems = 64  # problems per chunk: rows and progress are committed per chunk
  c.coldstart.passes = 1  # passes over the training file (fresh seeds each) to reach the targets
  c.coldstart.max_chunks = 0  # stop after this many chunks in one invocation (0 = no limit)
  c.coldstart.teacher_path = ""  # local HF directory of the teacher (own tokenizer); "" = policy
  c.coldstart.teacher_url = ""  # OpenAI-compatible server instead (e.g. vLLM): {url}/v1/chat/...
  c.coldstart.teacher_model = ""  # model name sent to teacher_url
  c.coldstart.teacher_temperature = 0.7
  c.coldstart.teacher_top_p = 0.95
  c.coldstart.teacher_workers = 16  # concurrent requests to teacher_url
  c.coldstart.teacher_timeout_s = 600.0  # one attempt at a request to teacher_url, reply included
  c.coldstart.teacher_retries = 3  # per request: connection errors, timeouts, HTTP 429 / 5xx

  c.eval = ml_collections.ConfigDict()
  c.eval.paths = ""  # comma-separated eval files (each in one of the data layouts)
  c.eval.toy_problems = 64  # no eval.paths: the first n of the toy domain's held-out problems
  c.eval.k = 4  # samples per problem
  c.eval.temperature = 0.6
  c.eval.top_p = 0.95
  c.eval.max_new_tokens = 1024
  c.eval.pass_ks = (1, 4)  # pass@k values reported (k <= eval.k)
  c.eval.greedy = False  # also one greedy (temperature 0) response per problem: <set>/greedy
  c.eval.reflection_markers = ("wait", "let me re", "re-examine", "mistake", "actually,")

  # mode=plan: per-device memory of this config on a device, from abstract shapes (tapo_jax.plan)
  c.plan = ml_collections.ConfigDict()
  c.plan.device = "v5p"  # v4 | v5e | v5p | v6e | h100 | h200, or a slice name such as v5p-32
  c.plan.chips = 0  # devices in the mesh; 0 = from the slice name, else one host's chips
  c.plan.shape = ""  # a named architecture (tapo_jax.models.shapes) when model.path is absent
  c.plan.mode = "rl"  # the mode planned: rl | sft
  c.plan.usable = 0.9  # fraction of HBM the peak may fill (runtime reserve, fragmentation)
  return c


def synthesis_max_new_tokens(cfg) -> int:
  """tapo.synthesis_max_new_tokens, or its default (0): rollout.max_new_tokens + 1024."""
  return cfg.tapo.synthesis_max_new_tokens or cfg.rollout.max_new_tokens + 1024


def micro_batch_tokens(cfg, width: int) -> int:
  """optim.micro_batch_tokens, or its default (0): optim.micro_batch rows of `width` tokens."""
  return cfg.optim.micro_batch_tokens or cfg.optim.micro_batch * width

r"""CPU demo: the paper's ablation at laptop scale on the synthetic catalogue.

Hardware: one CPU host (written for a 2-core, 24 GiB machine).

  bash tools/demo.sh            # stage 1, every row, BM25 and the hybrid, evaluated alike (README table)
  # or by hand: stage 1 aligns the image tower (image <-> title, image -> title words) and the text towers
  # (query <-> product text over stage 2's pairs and pseudo-queries)
  python -m mmr_jax.train --config configs/demo.py:stage=1 --workdir workdirs/demo/stage1
  # stage 2: query <-> product alignment through the fusion network, from stage 1 (init.load = FROM_STAGE1)
  python -m mmr_jax.train --config configs/demo.py:stage=2,variant=fusion \
      --workdir workdirs/demo/fusion_ft --config.init.workdir=workdirs/demo/stage1

Expected (test split, exact search, the same on every run on one machine; README has the table and says how much
another machine of the same kind moves the image rows): every learned row above BM25's 63.7 / 56.4 (R@100 / NDCG@10)
overall and on every tag: fusion_ft 91.5 / 73.4, concat_ft 90.7 / 71.8, text_only 79.6 / 68.2 (fusion_ft: the run
with the query <-> fused term, which the validation queries choose over the one without it, CHOSEN_ON_VALIDATION);
visual queries' NDCG@10 63.3 ... 66.5 against BM25's 50.8; the hybrid (fusion_ft + BM25) 91.5 / 73.7 (stage 1 250
steps, then 200 stage-2 steps on the batches after stage 1's, from its towers and its learned temperature; the
other rows 450). fusion_ft - text_only is +11.9 / +5.2 (the paper's +5.1 / +3.9); over seeds 0, 1, 2
(`--seeds 0,1,2`) +12.7 / +5.1 (NDCG@10 +5.2, +5.2, +5.0; 95 % interval over the test queries [+3.5, +6.7]), level
on textual queries' NDCG@10 (+0.4, -0.9, -0.7; [-2.3, +1.4]); fusion_ft above concat_ft at every seed in both
metrics (91.8 / 73.5 against 90.8 / 71.9; [+0.3, +1.7] / [+0.8, +2.3]). Against the same stage-1 text towers without
an image (`--rows ...,text_only_ft`: 79.1 / 68.6) the image adds +12.4 / +4.8.
The image pays through its 8 most likely words in the product's lexical segment (model.image_expansion_k), from a
head that reads the pooled image, its colour histogram (model.image_words_color_bins=8: 512 bins) and its texture
(model.image_words_texture_bins=8). The query's translation table (model.query_translation_k=3: the catalogue's
words for the shoppers' words no product uses, from the training pairs) is worth 9.8 NDCG@10 inside the trained
fusion_ft. The lexical segment's own learning rate (optim.lr_mult.lexical=10) is what first lifted NDCG@10 above
BM25's; stage 1's text term at twice the weight (loss.stage1_text=2), stage 1's image <-> title term on the image
side only (loss.stage1_lock_text), the stage-1 text side at 3x the rate in stage 2 (optim.init_lr_mult) and stage 1's
temperature loaded with its towers (FROM_STAGE1) lift the stage-1 rows. With `--budget long` (budget=long:
5x the steps and the query <-> fused term at half weight; 25 to 35 minutes here for stage 1, four rows and
fusion_ft's second run, which the validation queries do not choose) fusion_ft reaches 95.0 / 76.8, concat_ft
93.4 / 75.4 and text_only 82.9 / 68.4: fusion_ft - text_only +12.1 / +8.4, level on textual queries' NDCG@10 (95.4
against 95.4, [-2.2, +2.0]), fusion_ft - concat_ft NDCG@10 +1.5 ([+0.2, +2.5]); the hybrid (from fusion_ft)
95.0 / 77.8. `bash tools/demo.sh` takes about 8 to 10 minutes on the quiet 2-core machine from a warm venv (9 min 31 s
with the catalogue generated on the way, 8 min 14 s with it already there), more when the shared machine is loaded
(11 min 33 s with a test run beside it).

`text=S` or `text=B` swaps in a text-tower size preset (both towers; the fusion network follows its
width), e.g. to benchmark serving latency at a production-size query tower (README, Benchmarks).
`budget=long` gives one run the ablation's `--budget long` settings (5x the steps, and the settings above that
differ there).
`runlocal=True` shrinks everything further (a smoke test in seconds). The whole ablation
(`python -m mmr_jax.ablation`) runs these as one sweep: see `get_sweep`.
"""

from mmr_jax import config as config_lib


# What the stage-1 rows take from stage 1: the image tower (image <-> title) and the text side (query <-> product
# text): both text towers, their projection heads and the lexical segment where there is one; and the image ->
# words head (stage 1's image -> title words term) that puts the image's words into the product's lexical segment.
# And the learned temperature (`loss`: the logit scale) those towers were trained at: restarted at 1 / 0.07 while
# the towers arrive at stage 1's ~18.7, the first stage-2 steps re-fit the towers to the colder logits, and the
# stage-1 text towers ended 2.6 NDCG@10 behind text_only's on textual queries ([-4.2, -1.0], seeds 0, 1, 2). With
# it loaded, text_only_ft is level with text_only there (+3.6 [+2.3, +4.8]) and fusion_ft gains R@100 +2.2
# ([+1.5, +2.9]) and textual NDCG@10 +1.6 ([+0.8, +2.3]).
FROM_STAGE1 = ("image_tower", "heads/image", "query_tower", "product_text_tower", "heads/query",
               "heads/product_text", "lexical", "lexical_mix", "heads/image_words", "loss")


def get_config(arg=None):
  a = config_lib.parse_arg(arg, stage=2, variant="fusion", loss="softmax", runlocal=False,
                           data="data/synthetic", steps=0, batch=0, budget="default", text="")
  c = config_lib.base_config()
  c.stage = a.stage
  c.data.dir = a.data
  c.model.variant = a.variant
  c.loss.kind = a.loss
  c.data.batch_size = 64
  if a.text and a.runlocal:
    raise ValueError("text= and runlocal=True: runlocal shrinks the towers to its smoke size; pick one")
  if a.text:
    config_lib.set_text_tower(c, a.text, max_len=c.model.text.max_len)
  # Sized so the whole ablation (stage 1, four rows and fusion_ft's second run, each evaluated) fits the README's
  # ~10 minute budget on a 2-core CPU; more steps help every row (see README for the measured table).
  c.train.steps = 200 if a.stage == 2 else 250
  # Half the stage-2 examples are pseudo-queries from the catalogue's own text (data/pseudo_queries.py): the
  # labelled pairs alone are too few to teach the text towers the catalogue's vocabulary.
  c.data.pseudo_queries = 0.5
  # Stage 1 reads stage 2's stream and aligns the text side too (query <-> product text, on the labelled and
  # pseudo-queries) while the image tower aligns with the titles: rows that start from stage 1 get text towers
  # as far along as text_only's after as many steps, which stage 1's own pseudo-queries alone do not give. A stage 2
  # from it reads on from the batch where stage 1 stopped (data.stream_offset=-1, the default), so the stage-1 rows
  # see the batches text_only sees.
  c.data.stage1_source = "pairs"
  if a.stage == 1:
    # The image tower also predicts each title's words from the image: a direct signal (colours first) while
    # image <-> title is still weak at this budget.
    c.loss.image_words = 1.0
    # The query <-> product-text term weighs twice the image terms: the stage-1 rows' text side otherwise ends
    # behind text_only's (fusion_ft R@100 / NDCG@10 79.9 / 60.8 -> 82.3 / 61.5 at seed 0, 81.9 / 60.6 at seed 1).
    c.loss.stage1_text = 2.0
    # The image <-> title term trains the image side only: the text towers learn from the queries alone, and the
    # image aligns into their space. fusion_ft over seeds 0, 1, 2: 87.1 / 71.0 -> 89.2 / 71.4 (mean R@100 / NDCG@10),
    # at --budget long 94.3 / 74.1 -> 93.7 / 75.4; the image's words (stage 1's image -> title words term) do not
    # depend on it.
    c.loss.stage1_lock_text = True
  # Exact term matches count in the one inner product (models/two_tower.LexicalSegment); 1,024 buckets hold
  # the demo's whole vocabulary, a bigger one is hashed into them.
  c.model.lexical_dim = 1024
  # Its per-token weights start alike and must spread far (BM25's idf spans more than 10x) within a few hundred
  # steps; Adam moves a parameter by about the learning rate per step, so at the towers' rate they stay within
  # +-25 % of their init after 450 steps. At ten times the rate the pairs set them (0.1 ... 2.9 after 450 steps).
  c.optim.lr_mult.lexical = 10.0
  # A query word that no product uses ("gray" against "grey") also puts the catalogue's words for it into the query's
  # lexical bag: up to 3 per token, from the training pairs (model.query_translation_k, data.query_translation).
  c.model.query_translation_k = 3
  # The image -> words head (stage 1's image -> title words term, the image's words in the product's bag) also
  # reads each image's colour histogram (8^3 joint RGB bins): a ViT trained from scratch for a few hundred steps
  # on 32-pixel images learns colour slowly, a linear read of the histogram from the first steps. Both stages
  # set it, so stage 2 loads stage 1's head. At 4^3 bins the light colours share one bin (pink and white both fall in
  # 192 ... 255 on every channel); fusion_ft over seeds 0, 1, 2 at 4^3: 88.9 / 71.8 (mean R@100 / NDCG@10), 8^3:
  # 90.4 / 72.3.
  c.model.image_words_color_bins = 8
  # ... and its texture: gradient energy per orientation (8 bins), at two scales, over the whole image and its
  # central half (`two_tower.texture_histogram`): the pooled ViT at this budget carries colour but not pattern.
  # fusion_ft over seeds 0, 1, 2: 89.2 / 71.4 -> 88.6 / 72.0 (mean R@100 / NDCG@10), validation NDCG@10 75.7 -> 76.3.
  c.model.image_words_texture_bins = 8
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 20
  # Validation (in-batch, and retrieval over the validation catalogue) every 200 steps and at the last: each one
  # embeds the catalogue, about 4 s here, which at every 100 steps puts the whole ablation past its 10 minutes.
  c.train.eval_every = 200
  c.train.ckpt_every = 100
  if a.stage == 2:
    # A stage-1 (or pretrained) image tower moves slowly in stage 2, as in the paper's second stage; an image
    # tower trained from scratch here (concat, fusion_e2e) gets the full rate.
    c.optim.init_lr_mult.image_tower = 0.3
    # The text side from stage 1 moves faster than a text side trained from scratch: it has 200 of the row's 450
    # steps left to fit the query <-> product term, after a stage 1 that shared its steps with the image terms.
    # fusion_ft (R@100 / NDCG@10, textual NDCG@10) at 0.3x: 79.1 / 59.4, 80.2; 1x: 82.3 / 61.5, 85.5;
    # 2x: 83.8 / 62.6, 87.3; 3x: 82.9 / 63.3, 89.4; 4x: 82.2 / 63.4, 90.7 (text_only: 78.2 / 60.9, 87.9).
    for name in ("query_tower", "product_text_tower", "lexical", "lexical_mix"):
      c.optim.init_lr_mult[name] = 3.0
    c.init.load = FROM_STAGE1  # used when init.workdir names a stage-1 run
    # The fused branch also learns on its own (query <-> fused term): the text branch starts ahead, and without
    # this the fusion gate shuts (0.06) before the fused branch has learnt anything; with it the gate stays open.
    # With 5x the steps the fused branch no longer needs that much help, and at full weight the term costs the
    # queries the text answers: fusion_ft at budget=long, 0.5 against 1.0 (NDCG@10 points, test / validation): all
    # queries +0.4 / +1.7 and +0.8 / +2.8 at seeds 0 and 1, textual queries +2.5 / +3.6 and +1.3 / +0.6 (seed 0's
    # 95.5 above text_only's 94.9); 0.25 is within the noise of 0.5 on the validation queries (-0.4, +0.4). At the
    # default budget 0.5 changes nothing overall (+0.0 over seeds 0, 1, 2) and costs textual queries 0.7.
    # Without the term (seeds 0, 1, 2) fusion_ft loses 0.8 / 1.1 here, level with concat_ft; on images that say
    # nothing about their product (README, "Images that say nothing") the term costs it 2.5 R@100 and leaving it
    # out puts it level with text_only_ft: the ablation trains both (CHOSEN_ON_VALIDATION).
    c.loss.aux_query_fused = 0.5 if a.budget == "long" else 1.0
    # The product's lexical segment also holds the 8 words its image predicts most (heads/image_words, which
    # stage 1's image -> title words term trains): a photo of a red dress matches "red" where the text says
    # nothing. Rows without stage 1 learn that head from the retrieval loss alone. fusion_ft over seeds 0, 1, 2
    # (mean R@100 / NDCG@10, validation NDCG@10): 16 words 90.4 / 72.3, 76.0; 8 90.4 / 72.6, 76.6; 4 90.4 / 72.5,
    # 77.2. 8, not 4: a catalogue's photos can show more than colour, pattern and category.
    c.model.image_expansion_k = 8
  return config_lib.apply_budget(c, a)


# The ablation trains fusion_ft with and without its query <-> fused term and reports the one whose validation
# queries rank best (mmr_jax.ablation.choose_on_validation). The term lifts fusion_ft where the photos say what the
# text does not (here, over seeds 0, 1, 2: +0.8 / +1.1 R@100 / NDCG@10; the validation queries choose it at every
# seed, and at budget=long, seed 0) and costs 2 R@100 or more where they say nothing about their product (README,
# "Images that say nothing", where they choose fusion_ft_no_q2f at most seeds); which kind a catalogue's photos are
# is the catalogue's to say.
CHOSEN_ON_VALIDATION = {"fusion_ft": ("fusion_ft_no_q2f",)}


def get_sweep(arg=None):
  """The ablation rows as override dicts (the stage-1 run is a dependency, see mmr_jax.ablation).

  fusion_ft_no_q2f is the run fusion_ft is chosen against (CHOSEN_ON_VALIDATION); `launch.sweep` trains it as a
  point of its own, and `--rows ...,fusion_ft_no_q2f` makes it a row of its own in the ablation (no choice made).
  """
  del arg
  return [
      {"name": "text_only", "model.variant": "text_only"},
      {"name": "concat", "model.variant": "concat"},
      {"name": "concat_ft", "model.variant": "concat", "init.workdir": "{stage1}"},
      {"name": "fusion_ft", "model.variant": "fusion", "init.workdir": "{stage1}"},
      # fusion_ft without the query <-> fused term (CHOSEN_ON_VALIDATION).
      {"name": "fusion_ft_no_q2f", "model.variant": "fusion", "init.workdir": "{stage1}", "loss.aux_query_fused": 0.0},
      {"name": "fusion_e2e", "model.variant": "fusion"},
      # Three query segments leave no place for one lexical segment (nor for the image's words in it).
      {"name": "fusion_qw", "model.variant": "fusion_qw", "init.workdir": "{stage1}", "model.lexical_dim": 0,
       "model.image_expansion_k": 0, "model.query_translation_k": 0, "init.lexical_idf": False},
      # text_only from stage 1's text towers, without an image: fusion_ft and concat_ft minus this row is what
      # the image adds (ablation_margins.json "image_adds"). Not a default row (the demo's time budget).
      {"name": "text_only_ft", "model.variant": "text_only", "init.workdir": "{stage1}"},
      # text_only with hard negatives mined by stage 1's model (each labelled pair brings a pseudo-query of one
      # of its product's 16 nearest products; the ablation embeds the catalogue with stage 1 first). Not a
      # default row: it trades R@100 for NDCG@10 here (README).
      {"name": "text_only_mined", "model.variant": "text_only", "data.hard_negatives": 1, "data.pseudo_queries": 0.0,
       "data.hard_negative_embeddings": "{stage1}/catalogue_embeddings.npy"},
  ]

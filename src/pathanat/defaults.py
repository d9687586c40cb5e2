"""The defaults of the stages' settings, in a module that imports nothing.

Each stage's signature takes its defaults from here, and the `pathanat` command leaves an option
it was not given out of the call and quotes these in its help, so the help cannot drift from what
runs and printing it does not load torch.
"""

SEED = 0  # of every stage's random draws
SPLIT = "test"  # the split a trained run is measured, analysed and drawn from
DEFAULT_BATCH_SIZE = 32  # slices per batch of the evaluation stages
TEMPERATURE = 1.0  # of prior draws

# phantom
SLAB_MM = 48.0  # an axial slab around the brain centre (None: whole volumes)

# prepare
IN_PLANE_MM = 2.0
SLICE_MM = 1.0
SHAPE = (96, 112)  # multiples of 16: 2^L for the L = 4 downsamplings of the model
DEFAULT_SLICES = {"FLAIR": 24, "T2w": 24, "T1w": 16}  # the paper's MS and AD settings
WORKERS = 2
REGISTER = "none"  # the volumes are taken as aligned

# evaluate. The cost is linear in S (one top-down pass per sample; the encoder runs once).
# S = 32 keeps the test split of a 100-subject phantom (480 slices of 96 x 112) to minutes on
# 2 CPU cores (benchmarks/bench_evaluate.py); pass S = 100 or more for final numbers, as tables
# state S.
DEFAULT_IW_SAMPLES = 32
# prior draws for the FID/KID of samples (at least as many as the split has slices): FID falls as
# N grows, so N is stated beside it; a few hundred leave it far above its large-N value
FID_SAMPLES = 2048

# analyze: the pathology sensitivity analysis
SENSITIVITY_FACTORS = (0.0, 0.5, 1.5, 2.0, 3.0)  # latent scale factors
SENSITIVITY_EXAMPLES = 16  # test slices, those of the largest lesions
TRAIN_SPLIT = "train"  # the split the latent regressors are fitted on

# synthesize
TEMPERATURES = (0.6, 0.8, 1.0)  # rows of the prior figure
PRIOR_SAMPLES = 8  # per row of the prior figure
DRAWS = 6  # per row of the layers and conditional figures
STYLE_MIX_PAIRS = 4
PER_CLUSTER = 6  # test slices shown per VampPrior component

# validity. 1024 samples: a width-16 model at 96 x 112 draws and segments 256 in ~3.5 s on one
# loaded core (benchmarks/bench_validity.py), so a run takes well under a minute once the
# segmenters exist; the 95% interval over 256 noisy samples was already under +-1 point.
VALIDITY_SAMPLES = 1024

# counterfactual
COUNTERFACTUAL_PAIRS = 200  # test pairs swapped

# reproduce
BUDGET = "cpu"
SEEDS = 1  # training seeds per run of the grid

# demo
DEMO_SUBJECTS = 30

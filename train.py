"""Train, evaluate and sample makemore's MLP from the command line. `python train.py --help` for more.

python train.py fit                                    # the lecture's BatchNorm MLP (200,000 steps of batch 32)
python train.py fit --config configs/lecture/deep.yaml  # the lecture's deep net (configs/ holds the presets)
python train.py fit --help                             # every --model.*, --data.* and --trainer.* flag
python train.py predict --ckpt_path lightning_logs/version_0/checkpoints/last.ckpt
"""

import os
import warnings

# warnings about Lightning's own dependencies, not for the user: Lightning 2.2 imports setuptools' deprecated
# pkg_resources, and LightningCLI calls jsonargparse functions that jsonargparse deprecates (its own switch)
warnings.filterwarnings("ignore", message=r".*pkg_resources.*")
os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")

from lightning_makemore.cli import main  # noqa: E402

if __name__ == "__main__":
    main()

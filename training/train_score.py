"""Train a score model with denoising score matching (entry script for ``accelerate launch``).

    accelerate launch training/train_score.py --dataset_name digits --resolution 16 --max_train_steps 2000

The implementation lives in ``diffusers_msgm.training.train_score`` so that ``msgm train`` runs the same code.
"""

from diffusers_msgm.training.train_score import main, parse_args

if __name__ == "__main__":
    main(parse_args())

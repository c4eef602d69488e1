"""MSGM unlearning of a pretrained score model (entry script for ``accelerate launch``).

    accelerate launch training/unlearn.py --pretrained_model_name_or_path msgm-digits \
        --forget_labels 1 --variant obtuse --max_train_steps 200

The implementation lives in ``diffusers_msgm.training.unlearn`` so that ``msgm unlearn`` runs the same code.
"""

from diffusers_msgm.training.unlearn import main, parse_args

if __name__ == "__main__":
    main(parse_args())

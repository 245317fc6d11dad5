"""IBISAgent training: trajectory data, cold-start SFT and agentic RL.

The repository folder `training/` is installed and imported as `ibisagent_training` (sam2 installs an unrelated
top-level package named `training`), so modules here import each other relatively, and the console entry point is
`ibisagent-train` (`cli.py`). Importing any module loads no torch; the trainers import it when they run.

    data.py       BiomedParse-format folders loaded with MONAI (image, target mask, modality, group)
    synthetic.py  synthetic shapes in BiomedParse layout, for experiments and tests
    generate.py   trajectory generation: the click simulator with the tool in the loop, reflective variants, statistics
    records.py    TrajectoryRecord, the one record type that generation writes and SFT, GRPO and the statistics read
    prompts.py    the instruction and answer library      leaks.py  words a text for the agent must never use
    reasoning.py  the weight-free <think> generator       teacher.py  an optional teacher LLM for both
    rewards.py    the rule-based rewards (trl's reward-function shape)
    common.py     what SFT and GRPO share: IGNORE_INDEX, collate, vision freezing, the pad id
    sft.py        cold-start SFT with trl's SFTTrainer
    grpo/         agentic RL: config, rows, rollout, objective, trainer
    cli.py        `ibisagent-train trajectories | stats | coco-json | sft | grpo`

The chat format the conversations use is the core's (`ibisagent.chat`); models load through the core's
`ibisagent.policies.hf_vlm.load_pretrained`, as the policy does at inference.
"""

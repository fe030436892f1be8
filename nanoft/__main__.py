"""nanoft's commands, each a leaf that nothing imports: `python -m nanoft <command> [args]`.

    python -m nanoft memory configs/100m.py --finetune=qlora --measure   # what a run needs, estimated and measured
    python -m nanoft check                                              # this machine's path, kernels to training
    python -m nanoft export out/tiny --to out/tiny-hf                   # to transformers and peft (and back), or GGUF
    python -m nanoft merge --adapter out/lora --out out/lora-merged     # fold LoRA into the base's weights
    python -m nanoft plot out/tiny out/try --to out/loss.png            # loss and lr curves side by side
    python -m nanoft reward out/reward --prompt P --response R          # score responses with a reward model
    python -m nanoft quantize out/tiny --method gptq --bits 4 --to out/tiny-gptq4   # post-training INT8/INT4
    python -m nanoft evaluate out/tiny-gptq4                            # val loss and perplexity of any checkpoint
"""
import runpy
import sys

COMMANDS = {  # name -> the module that runs it (its own `if __name__ == "__main__":` parses and reports errors)
    "memory": "nanoft.tools.memory.command",
    "check": "nanoft.tools.check",
    "export": "nanoft.tools.export",
    "merge": "nanoft.tools.merge",
    "plot": "nanoft.tools.plot",
    "reward": "nanoft.tools.reward",
    "quantize": "nanoft.tools.quantize",
    "evaluate": "nanoft.tools.evaluate",
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        asked = f"unknown command {sys.argv[1]!r}; " if len(sys.argv) > 1 and sys.argv[1] not in ("-h", "--help") else ""
        sys.exit(f"{asked}usage: python -m nanoft <command> [args]; commands: {', '.join(COMMANDS)}\n{__doc__}")
    command = sys.argv.pop(1)
    sys.argv[0] = f"python -m nanoft {command}"
    runpy.run_module(COMMANDS[command], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()

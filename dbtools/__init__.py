"""dbtools: caption, organise and train Stable Diffusion DreamBooth datasets.

Importing the package has no side effects; each stage lives in its own module
(`images`, `captions`, `autocaption`, `extract`, `concepts`, `models`, `classgen`,
`data`, `train_config`, `train`, `checkpoints`, `export`, `preview`, `editor`,
`generate`, `cleanup`, `notebook`, `tiny`, `demo`) and is imported on use.
"""

__version__ = "0.1.0"

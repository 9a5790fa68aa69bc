"""The papers behind the methods, as BibTeX: a method's registry entry (train/methods.py) names its own,
and a model card (report/card.py) prints them. arXiv ids were checked against the papers' arXiv / Hugging
Face paper pages; a long author list ends in `and others` rather than being guessed at.
"""

from __future__ import annotations

DPO = """@inproceedings{rafailov2023dpo,
  title = {Direct Preference Optimization: Your Language Model is Secretly a Reward Model},
  author = {Rafailov, Rafael and Sharma, Archit and Mitchell, Eric and Ermon, Stefano and
    Manning, Christopher D. and Finn, Chelsea},
  booktitle = {Advances in Neural Information Processing Systems},
  year = {2023},
  eprint = {2305.18290},
  archivePrefix = {arXiv}
}"""

CDPO = """@misc{mitchell2023cdpo,
  title = {A note on {DPO} with noisy preferences \\& relationship to {IPO}},
  author = {Mitchell, Eric},
  year = {2023},
  howpublished = {\\url{https://ericmitchell.ai/cdpo.pdf}}
}"""

ROBUST = """@inproceedings{chowdhury2024robust,
  title = {Provably Robust {DPO}: Aligning Language Models with Noisy Feedback},
  author = {Ray Chowdhury, Sayak and Kini, Anush and Natarajan, Nagarajan},
  booktitle = {Proceedings of the 41st International Conference on Machine Learning},
  year = {2024},
  eprint = {2403.00409},
  archivePrefix = {arXiv}
}"""

IPO = """@misc{azar2023ipo,
  title = {A General Theoretical Paradigm to Understand Learning from Human Preferences},
  author = {Azar, Mohammad Gheshlaghi and Rowland, Mark and Piot, Bilal and Guo, Daniel and
    Calandriello, Daniele and Valko, Michal and Munos, R{\\'e}mi},
  note = {AISTATS 2024},
  year = {2023},
  eprint = {2310.12036},
  archivePrefix = {arXiv}
}"""

SLIC_HF = """@misc{zhao2023slichf,
  title = {{SLiC-HF}: Sequence Likelihood Calibration with Human Feedback},
  author = {Zhao, Yao and Joshi, Rishabh and Liu, Tianqi and Khalman, Misha and Saleh, Mohammad and Liu, Peter J.},
  year = {2023},
  eprint = {2305.10425},
  archivePrefix = {arXiv}
}"""

SIMPO = """@inproceedings{meng2024simpo,
  title = {{SimPO}: Simple Preference Optimization with a Reference-Free Reward},
  author = {Meng, Yu and Xia, Mengzhou and Chen, Danqi},
  booktitle = {Advances in Neural Information Processing Systems},
  year = {2024},
  eprint = {2405.14734},
  archivePrefix = {arXiv}
}"""

ORPO = """@inproceedings{hong2024orpo,
  title = {{ORPO}: Monolithic Preference Optimization without Reference Model},
  author = {Hong, Jiwoo and Lee, Noah and Thorne, James},
  booktitle = {Proceedings of the 2024 Conference on Empirical Methods in Natural Language Processing},
  year = {2024},
  eprint = {2403.07691},
  archivePrefix = {arXiv}
}"""

KTO = """@inproceedings{ethayarajh2024kto,
  title = {Model Alignment as Prospect Theoretic Optimization},
  author = {Ethayarajh, Kawin and Xu, Winnie and Muennighoff, Niklas and Jurafsky, Dan and Kiela, Douwe},
  booktitle = {Proceedings of the 41st International Conference on Machine Learning},
  year = {2024},
  eprint = {2402.01306},
  archivePrefix = {arXiv}
}"""

INSTRUCTGPT = """@inproceedings{ouyang2022instructgpt,
  title = {Training language models to follow instructions with human feedback},
  author = {Ouyang, Long and Wu, Jeff and Jiang, Xu and Almeida, Diogo and others},
  booktitle = {Advances in Neural Information Processing Systems},
  year = {2022},
  eprint = {2203.02155},
  archivePrefix = {arXiv}
}"""

BRADLEY_TERRY = """@article{bradley1952rank,
  title = {Rank Analysis of Incomplete Block Designs: {I}. The Method of Paired Comparisons},
  author = {Bradley, Ralph Allan and Terry, Milton E.},
  journal = {Biometrika},
  volume = {39},
  number = {3/4},
  pages = {324--345},
  year = {1952}
}"""

PPO = """@misc{schulman2017ppo,
  title = {Proximal Policy Optimization Algorithms},
  author = {Schulman, John and Wolski, Filip and Dhariwal, Prafulla and Radford, Alec and Klimov, Oleg},
  year = {2017},
  eprint = {1707.06347},
  archivePrefix = {arXiv}
}"""

RLOO = """@inproceedings{ahmadian2024rloo,
  title = {Back to Basics: Revisiting {REINFORCE} Style Optimization for Learning from Human Feedback in {LLMs}},
  author = {Ahmadian, Arash and Cremer, Chris and Gall{\\'e}, Matthias and Fadaee, Marzieh and
    Kreutzer, Julia and others},
  booktitle = {Proceedings of the 62nd Annual Meeting of the Association for Computational Linguistics},
  year = {2024},
  eprint = {2402.14740},
  archivePrefix = {arXiv}
}"""

GRPO = """@misc{shao2024deepseekmath,
  title = {{DeepSeekMath}: Pushing the Limits of Mathematical Reasoning in Open Language Models},
  author = {Shao, Zhihong and Wang, Peiyi and Zhu, Qihao and Xu, Runxin and Song, Junxiao and others},
  year = {2024},
  eprint = {2402.03300},
  archivePrefix = {arXiv}
}"""

# terms a config can switch on, each cited when it is on
RPO = """@inproceedings{pang2024irpo,
  title = {Iterative Reasoning Preference Optimization},
  author = {Pang, Richard Yuanzhe and Yuan, Weizhe and Cho, Kyunghyun and He, He and Sukhbaatar, Sainbayar and
    Weston, Jason},
  booktitle = {Advances in Neural Information Processing Systems},
  year = {2024},
  eprint = {2404.19733},
  archivePrefix = {arXiv}
}"""

RPO_LIU = """@misc{liu2024rpo,
  title = {Provably Mitigating Overoptimization in {RLHF}: Your {SFT} Loss is Implicitly an Adversarial Regularizer},
  author = {Liu, Zhihan and others},
  year = {2024},
  eprint = {2405.16436},
  archivePrefix = {arXiv}
}"""

ADAPTIVE_KL = """@misc{ziegler2019finetuning,
  title = {Fine-Tuning Language Models from Human Preferences},
  author = {Ziegler, Daniel M. and Stiennon, Nisan and others},
  year = {2019},
  eprint = {1909.08593},
  archivePrefix = {arXiv}
}"""

"""mode = coldstart: the cold-start SFT set (`build`) and the teachers that write its
constructions (`teachers`). It runs above train/, whose rollout machinery it uses."""

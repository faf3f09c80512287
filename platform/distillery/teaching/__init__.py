"""How the teacher's parts are trained: the frozen encoder's item text (`item_text`), the sequence
models (`sequence`), the text classifiers (`text`, with the text augmentation of `augment`), the
grids they are chosen from (`grid`) and the Ray Train runs that train them (`runs`). The `teacher`
stage calls these and assembles the teacher."""

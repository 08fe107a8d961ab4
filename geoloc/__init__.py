"""The machinery under the stage scripts. Dependencies run one way (tests/test_imports.py checks it):
errors <- runlog <- data <- nn <- eval, train <- cli; nothing here imports a stage script, run_all.py or the study.

    data/   what images and labels are: geometry, the image readers, the tf.data pipeline, the splits
    nn/     the network's building blocks (layers) and the embedder that runs the model on images
    train/  one training run: the loop, its state, checkpoints, mining, distribution, the run lock
    eval/   --test: the driver, its protocols, the metrics, the results file and the figures
    cli.py  what a stage script calls (its environment, `main`); errors.py, runlog.py
"""

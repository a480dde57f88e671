"""A tiny distilled student for eval/coverage tests, built without zsd.train (owned elsewhere)."""

import numpy as np
import torch
import torch.nn.functional as F

from zsd.sources import RowReader, load_rgb
from zsd.store import open_store
from zsd.student import Student, save_student, student_preprocess
from zsd.views import Preprocess, normalize, render_view

STUDENT = "test_efficientnet"


def make_student(run_dir, store_path, steps=0, seed=0):
    """Save a 32 px student of the store's teacher; `steps` Adam steps of L2 on the store's view 0."""
    torch.manual_seed(seed)
    store = open_store(store_path)
    model = Student(STUDENT, store.dim, 32)
    pre = student_preprocess(STUDENT, Preprocess.from_dict(store.teacher["preprocess"]), 32)
    if steps:
        reader = RowReader(store.sources)
        keys, locs, params = store.keys(), store.locs(), store.view_params()
        x = torch.stack([normalize(render_view(load_rgb(reader.read(k, l)), 0, p[0], pre), pre.mean, pre.std)
                         for k, l, p in zip(keys, locs, params)])
        target = torch.from_numpy(store.embeddings(view=0).astype(np.float32))
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(steps):
            loss = (F.normalize(model(x), dim=-1) - target).pow(2).sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
    config = {"student": STUDENT, "embed_dim": store.dim, "preprocess": pre.to_dict(), "teacher": store.teacher,
              "teacher_id": store.teacher_id, "train_args": {"steps": steps}}
    save_student(run_dir, model, config)
    return model, config

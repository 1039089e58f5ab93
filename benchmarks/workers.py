"""Benchmark worker: one process per (library, thread count), driven by benchmarks/run.py.

    python benchmarks/workers.py LIB      LIB: bnnet | bnnet-numpy | torch | jax

The parent sets the thread counts in the environment before starting us (each
library reads them at import), sends one JSON task per line on stdin and reads
one JSON result per line on stdout. Only one worker runs at a time: the others
wait on stdin, so two libraries' thread pools never compete for the cores.
"""

import json
import os
import sys
import time

import numpy as np

LIB = sys.argv[1]
if LIB == "bnnet-numpy":
    os.environ["BNNET_BACKEND"] = "numpy"
elif LIB == "bnnet":
    os.environ["BNNET_BACKEND"] = "numba"


def timed(fn, reps, min_seconds=0.0):
    """Run fn once to warm up, then `reps` times; return the list of seconds per call."""
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < reps or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def make_batches(sizes, batch, k=8, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.random((k * batch, sizes[0]), dtype=np.float32)
    y = rng.integers(0, sizes[-1], k * batch)
    return X, y


# --------------------------------------------------------------------------
# bnnet (numba or numpy backend)
# --------------------------------------------------------------------------


class Bnnet:
    def __init__(self):
        import bnnet

        self.bnnet = bnnet

    def info(self, task):
        import numba

        from bnnet import backend

        out = {
            "library": f"bnnet {self.bnnet.__version__} ({backend.get_backend()})",
            "numpy": np.__version__,
            "numba": numba.__version__,
            "numba_threads": numba.get_num_threads(),
        }
        try:
            from threadpoolctl import threadpool_info

            out["blas"] = [
                {k: d.get(k) for k in ("internal_api", "version", "num_threads", "architecture")}
                for d in threadpool_info()
                if d.get("user_api") == "blas"
            ]
        except ImportError:
            out["blas"] = "threadpoolctl not installed"
        return out

    def bandwidth(self, task):
        from numba import njit, prange

        @njit(inline="always", fastmath=True)
        def _sum(v):
            s = 0.0
            for i in range(v.size):
                s += v[i]
            return s

        @njit(inline="always")
        def _copy(a, b):
            for i in range(a.size):
                b[i] = a[i]

        @njit(parallel=True, fastmath=True)
        def read(x, chunks):
            rows = (x.size + chunks - 1) // chunks
            part = np.zeros(chunks)
            for c in prange(chunks):
                part[c] = _sum(x[c * rows : min(x.size, (c + 1) * rows)])
            return part.sum()

        @njit(parallel=True)
        def copy(x, y, chunks):
            rows = (x.size + chunks - 1) // chunks
            for c in prange(chunks):
                _copy(x[c * rows : min(x.size, (c + 1) * rows)], y[c * rows : min(x.size, (c + 1) * rows)])

        import numba

        chunks = numba.get_num_threads()
        x = np.random.default_rng(0).random(task["elements"], dtype=np.float32)
        y = np.zeros_like(x)
        t_read = min(timed(lambda: read(x, chunks), 5))
        t_copy = min(timed(lambda: copy(x, y, chunks), 5))
        t_np = min(timed(lambda: np.copyto(y, x), 5))
        return {
            "read_GBps": x.nbytes / t_read / 1e9,
            "copy_GBps": 2 * x.nbytes / t_copy / 1e9,
            "numpy_copy_GBps": 2 * x.nbytes / t_np / 1e9,
        }

    def sgemm(self, task):
        out = {}
        for m, k, n in task["shapes"]:
            a = np.random.default_rng(0).random((m, k), dtype=np.float32)
            b = np.random.default_rng(1).random((k, n), dtype=np.float32)
            c = np.empty((m, n), np.float32)
            t = min(timed(lambda a=a, b=b, c=c: np.matmul(a, b, out=c), task["reps"], 0.3))
            out[f"{m}x{k}x{n}"] = 2 * m * k * n / t / 1e9
        return out

    def bn(self, task):
        """BatchNorm forward + backward through the public layer; shape (N, D) or (N, C, H, W)."""
        from bnnet.layers import BatchNorm

        shape = task["shape"]
        rng = np.random.default_rng(0)
        x = rng.standard_normal(shape, dtype=np.float32)
        dy = rng.standard_normal(shape, dtype=np.float32)
        layer = BatchNorm(shape[1])
        # The public API: forward/backward return new arrays, or write into `out` when given
        # (task "out": the caller's own buffers, as PyTorch's out= variants).
        y_buf, dx_buf = (np.empty_like(x), np.empty_like(x)) if task.get("out") else (None, None)

        def step():
            layer.forward(x, True, out=y_buf)
            layer.backward(dy, out=dx_buf)

        return {"times": timed(step, task["reps"], task.get("min_seconds", 0.5))}

    def cnnstep(self, task):
        """One SGD step of bnnet.convnet(in_shape=(1, 28, 28), channels, hidden) at `batch`; with
        task["profile"], also the seconds spent inside the Conv2d layers (forward + backward)."""
        bnnet = self.bnnet
        from bnnet.conv import Conv2d

        model = bnnet.convnet((1, 28, 28), channels=task["channels"], hidden=task["hidden"], classes=10, seed=0)
        X, y = make_batches([784, 10], task["batch"])
        state = {"conv": 0.0}
        if task.get("profile"):
            for layer in model.layers:
                if isinstance(layer, Conv2d):
                    for name in ("_forward", "_backward"):
                        inner = getattr(layer, name)

                        def wrapped(*a, _inner=inner, **kw):
                            t = time.perf_counter()
                            try:
                                return _inner(*a, **kw)
                            finally:
                                state["conv"] += time.perf_counter() - t

                        setattr(layer, name, wrapped)
        times = self._sgd_steps(model, X.reshape(-1, 1, 28, 28), y, task)["times"]
        return {"times": times, "conv_seconds": state["conv"] / (len(times) + 1)}

    def step(self, task):
        """task["mode"]: "loop" (default: the lecture's four calls), "compiled" (bnnet.compile_step: the
        same step built once, one call per mini-batch) or "fit" (bnnet.fit over the same batches, per step)."""
        model = self.bnnet.mlp(task["sizes"], activation=task["activation"], seed=0)
        X, y = make_batches(task["sizes"], task["batch"])
        mode = task.get("mode", "loop")
        if mode == "fit":  # 64 mini-batches per epoch, so that fit's set-up is spread as in a real run
            return self._fit_steps(model, *make_batches(task["sizes"], task["batch"], k=64), task)
        return self._sgd_steps(model, X, y, task, compiled=mode == "compiled")

    def _fit_steps(self, model, X, y, task):
        """Seconds per mini-batch of bnnet.fit (one epoch over X per call: shuffling, the step, the
        finiteness commit, the running loss; no progress bar)."""
        bnnet, batch = self.bnnet, task["batch"]
        opt = bnnet.optim.SGD(task["lr"])
        steps = len(X) // batch

        def epoch():
            bnnet.fit(model, X, y, optimizer=opt, epochs=1, batch_size=batch, seed=0, progress=False)

        return {"times": [t / steps for t in timed(epoch, max(1, task["reps"] // steps), task.get("min_seconds", 1.0))]}

    def _sgd_steps(self, model, X, y, task, compiled=False):
        """Time SGD steps through the public API on consecutive mini-batches of X, y: the lecture's loop,
        or (compiled) one call of bnnet.compile_step per mini-batch."""
        opt = self.bnnet.optim.SGD(task["lr"])
        loss_fn = self.bnnet.losses.SoftmaxCrossEntropy()
        batch, k, state = task["batch"], len(X) // task["batch"], {"i": 0}
        train_step = self.bnnet.compile_step(model, loss_fn, opt, batch) if compiled else None

        def step():
            j = (state["i"] % k) * batch
            state["i"] += 1
            if train_step is not None:
                train_step(X[j : j + batch], y[j : j + batch])
                return
            loss_fn.forward(model.forward(X[j : j + batch], train=True), y[j : j + batch])
            model.backward(loss_fn.backward())
            opt.step(model)

        return {"times": timed(step, task["reps"], task.get("min_seconds", 1.0))}

    def gemms(self, task):
        """The step's matrix products alone, back to back, with the BLAS threads the plan would use:
        forward x @ W, dW = x.T @ dz and dx = dz @ W.T (not for the first layer)."""
        bnnet = self.bnnet
        sizes, batch = task["sizes"], task["batch"]
        rng = np.random.default_rng(0)
        acts = [rng.random((batch, d), dtype=np.float32) for d in sizes]
        Ws = [rng.random((i, o), dtype=np.float32) for i, o in zip(sizes[:-1], sizes[1:])]
        outs = [np.empty((batch, o), np.float32) for o in sizes[1:]]
        dWs = [np.empty_like(W) for W in Ws]
        dxs = [np.empty((batch, i), np.float32) for i in sizes[:-1]]
        bnnet.threads.for_gemm(batch * max(i * o for i, o in zip(sizes[:-1], sizes[1:])))

        def run():
            for l, W in enumerate(Ws):
                np.matmul(acts[l], W, out=outs[l])
            for l in range(len(Ws) - 1, -1, -1):
                np.matmul(acts[l].T, acts[l + 1], out=dWs[l])
                if l:
                    np.matmul(acts[l + 1], Ws[l].T, out=dxs[l])

        return {"times": timed(run, task["reps"], task.get("min_seconds", 1.0))}

    def predict(self, task):
        """Eval-mode prediction of a trained net, with and without BatchNorm folded into the Linears."""
        bnnet = self.bnnet
        sizes, act = task["sizes"], task["activation"]
        model = bnnet.mlp(sizes, activation=act, seed=0)
        X, y = make_batches(sizes, 256, k=4)
        bnnet.fit(model, X, y, epochs=1, batch_size=256, seed=0, progress=False)
        folded = bnnet.fold_batchnorm(model)
        Xp = np.random.default_rng(1).random((task["rows"], sizes[0]), dtype=np.float32)
        return {
            "unfolded": timed(lambda: model.predict(Xp), task["reps"], 0.5),
            "folded": timed(lambda: folded.predict(Xp), task["reps"], 0.5),
        }

    def memory(self, task):
        """Peak traced memory of one training step vs what the step must hold."""
        import tracemalloc

        bnnet = self.bnnet
        sizes, act, batch = task["sizes"], task["activation"], task["batch"]
        tracemalloc.start()
        X, y = make_batches(sizes, batch, k=1)
        model = bnnet.mlp(sizes, activation=act, seed=0)
        opt = bnnet.optim.Adam(1e-3) if task.get("optimizer") == "adam" else bnnet.optim.SGD(task["lr"])
        loss_fn = bnnet.losses.SoftmaxCrossEntropy()

        def step():
            loss_fn.forward(model.forward(X, train=True), y)
            model.backward(loss_fn.backward())
            opt.step(model)

        step()
        step()
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        step()
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        params = sum(p.nbytes for p in model.params.values())
        grads = sum(g.nbytes for g in model.grads.values())
        state = sum(v.nbytes for st in opt.state.values() for v in st.values())
        # what backward needs besides the input batch: per hidden layer z = x @ W (BN's input)
        # and a = g(BN(z)) (the next Linear's input), and the logits
        acts = sum(2 * batch * d * 4 for d in sizes[1:-1]) + batch * sizes[-1] * 4
        return {
            "peak_bytes": peak,
            "live_bytes_between_steps": base,
            "params": params,
            "grads": grads,
            "optimizer_state": state,
            "activations": acts,
            "input_batch": X.nbytes,
        }


# --------------------------------------------------------------------------
# PyTorch (CPU)
# --------------------------------------------------------------------------


class Torch:
    def __init__(self):
        import torch

        self.torch = torch
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

    def info(self, task):
        return {
            "library": f"torch {self.torch.__version__}",
            "threads": self.torch.get_num_threads(),
            "config": self.torch.__config__.show().splitlines()[1:6],
        }

    def bn(self, task):
        """F.batch_norm + autograd; shape (N, D) or (N, C, H, W)."""
        torch = self.torch
        shape = task["shape"]
        x = torch.randn(*shape, requires_grad=True)
        w = torch.ones(shape[1], requires_grad=True)
        b = torch.zeros(shape[1], requires_grad=True)
        dy = torch.randn(*shape)
        rm, rv = torch.zeros(shape[1]), torch.ones(shape[1])

        def step():
            y = torch.nn.functional.batch_norm(x, rm, rv, w, b, training=True, momentum=0.1, eps=1e-5)
            x.grad = w.grad = b.grad = None
            y.backward(dy)

        return {"times": timed(step, task["reps"], task.get("min_seconds", 0.5))}

    def cnnstep(self, task):
        torch = self.torch
        mods, c, side = [], 1, 28
        for out in task["channels"]:
            mods += [
                torch.nn.Conv2d(c, out, 3, padding=1, bias=False),
                torch.nn.BatchNorm2d(out),
                torch.nn.ReLU(),
                torch.nn.MaxPool2d(2),
            ]
            c, side = out, side // 2
        mods.append(torch.nn.Flatten())
        width = c * side * side
        for h in task["hidden"]:
            mods += [torch.nn.Linear(width, h, bias=False), torch.nn.BatchNorm1d(h), torch.nn.ReLU()]
            width = h
        mods.append(torch.nn.Linear(width, 10))
        model = torch.nn.Sequential(*mods)
        X, y = make_batches([784, 10], task["batch"])
        return self._sgd_steps(model, X.reshape(-1, 1, 28, 28), y, task)

    def step(self, task):
        torch = self.torch
        sizes, act, batch = task["sizes"], task["activation"], task["batch"]
        acts = {"relu": torch.nn.ReLU, "sigmoid": torch.nn.Sigmoid, "tanh": torch.nn.Tanh}
        mods = []
        for i, o in zip(sizes[:-2], sizes[1:-1]):
            mods += [torch.nn.Linear(i, o, bias=False), torch.nn.BatchNorm1d(o), acts[act]()]
        mods.append(torch.nn.Linear(sizes[-2], sizes[-1]))
        model = torch.nn.Sequential(*mods)
        return self._sgd_steps(model, *make_batches(sizes, batch), task)

    def _sgd_steps(self, model, X, y, task):
        """Time SGD steps of `model` on consecutive mini-batches of X, y (numpy arrays)."""
        torch = self.torch
        opt = torch.optim.SGD(model.parameters(), lr=task["lr"])
        X, y = torch.from_numpy(X), torch.from_numpy(y)
        batch, k, state = task["batch"], len(X) // task["batch"], {"i": 0}

        def step():
            j = (state["i"] % k) * batch
            state["i"] += 1
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(X[j : j + batch]), y[j : j + batch])
            loss.backward()
            opt.step()

        return {"times": timed(step, task["reps"], task.get("min_seconds", 1.0))}


# --------------------------------------------------------------------------
# JAX (CPU), everything under jax.jit
# --------------------------------------------------------------------------


class Jax:
    def __init__(self):
        import jax
        import jax.numpy as jnp

        self.jax, self.jnp = jax, jnp

    def info(self, task):
        return {
            "library": f"jax {self.jax.__version__}",
            "devices": [str(d) for d in self.jax.devices()],
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
        }

    @staticmethod
    def _bn(jnp, x, gamma, beta, eps=1e-5):
        """Batch norm over every axis but 1; gamma, beta shaped to broadcast ((C,) or (1, C, 1, 1))."""
        axes = (0, *range(2, x.ndim))
        mean = x.mean(axis=axes, keepdims=x.ndim > 2)
        var = ((x - mean) ** 2).mean(axis=axes, keepdims=x.ndim > 2)
        return (x - mean) / jnp.sqrt(var + eps) * gamma + beta, mean, var

    def bn(self, task):
        """jit of BN and its vjp; shape (N, D) or (N, C, H, W)."""
        jax, jnp = self.jax, self.jnp
        shape = task["shape"]
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
        dy = jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
        per_channel = (shape[1],) if len(shape) == 2 else (1, shape[1], *[1] * (len(shape) - 2))
        g, b = jnp.ones(per_channel, jnp.float32), jnp.zeros(per_channel, jnp.float32)

        @jax.jit
        def fwd_bwd(x, g, b, dy):
            (y, mean, var), vjp = jax.vjp(lambda x, g, b: self._bn(jnp, x, g, b), x, g, b)
            dx, dg, db = vjp((dy, jnp.zeros_like(mean), jnp.zeros_like(var)))
            return y, mean, var, dx, dg, db

        def step():
            jax.block_until_ready(fwd_bwd(x, g, b, dy))

        return {"times": timed(step, task["reps"], task.get("min_seconds", 0.5))}

    def cnnstep(self, task):
        jax, jnp = self.jax, self.jnp
        lax = jax.lax
        lr = task["lr"]
        rng = np.random.default_rng(0)
        convs, fcs, c, side = [], [], 1, 28
        for out in task["channels"]:
            convs.append(
                {
                    "W": jnp.asarray(rng.standard_normal((out, c, 3, 3), dtype=np.float32) * np.sqrt(2 / (9 * c))),
                    "gamma": jnp.ones((1, out, 1, 1)),
                    "beta": jnp.zeros((1, out, 1, 1)),
                }
            )
            c, side = out, side // 2
        width = c * side * side
        for h in task["hidden"]:
            fcs.append(
                {
                    "W": jnp.asarray(rng.standard_normal((width, h), dtype=np.float32) * np.sqrt(2 / width)),
                    "gamma": jnp.ones(h),
                    "beta": jnp.zeros(h),
                }
            )
            width = h
        last = {"W": jnp.asarray(rng.standard_normal((width, 10), dtype=np.float32) * 0.1), "b": jnp.zeros(10)}
        params = {"convs": convs, "fcs": fcs, "last": last}

        def loss_fn(params, x, y):
            stats = []
            for p in params["convs"]:
                z = lax.conv_general_dilated(
                    x, p["W"], (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NCHW", "OIHW", "NCHW")
                )
                z, *st = self._bn(jnp, z, p["gamma"], p["beta"])
                stats.append(st)
                x = lax.reduce_window(jax.nn.relu(z), -jnp.inf, lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")
            x = x.reshape(x.shape[0], -1)
            for p in params["fcs"]:
                z, *st = self._bn(jnp, x @ p["W"], p["gamma"], p["beta"])
                stats.append(st)
                x = jax.nn.relu(z)
            logits = x @ params["last"]["W"] + params["last"]["b"]
            logp = jax.nn.log_softmax(logits)
            return -jnp.take_along_axis(logp, y[:, None], axis=1).mean(), stats

        @jax.jit
        def train_step(params, x, y):
            (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, y)
            return jax.tree_util.tree_map(lambda p, g: p - lr * g, params, grads), stats, loss

        X, y = make_batches([784, 10], task["batch"])
        X = X.reshape(-1, 1, 28, 28)
        batch = task["batch"]
        batches = [(jnp.asarray(X[j : j + batch]), jnp.asarray(y[j : j + batch])) for j in range(0, len(X), batch)]
        state = {"i": 0, "params": params}

        def step():
            xb, yb = batches[state["i"] % len(batches)]
            state["i"] += 1
            state["params"], _, loss = train_step(state["params"], xb, yb)
            loss.block_until_ready()

        return {"times": timed(step, task["reps"], task.get("min_seconds", 1.0))}

    def step(self, task):
        jax, jnp = self.jax, self.jnp
        sizes, act, batch, lr = task["sizes"], task["activation"], task["batch"], task["lr"]
        acts = {"relu": jax.nn.relu, "sigmoid": jax.nn.sigmoid, "tanh": jnp.tanh}
        g = acts[act]
        rng = np.random.default_rng(0)
        params, stats = [], []
        for i, o in zip(sizes[:-2], sizes[1:-1]):
            params.append(
                {
                    "W": jnp.asarray(rng.standard_normal((i, o), dtype=np.float32) * np.sqrt(2 / i)),
                    "gamma": jnp.ones(o),
                    "beta": jnp.zeros(o),
                }
            )
            stats.append({"mean": jnp.zeros(o), "var": jnp.ones(o)})
        params.append(
            {
                "W": jnp.asarray(rng.standard_normal((sizes[-2], sizes[-1]), dtype=np.float32) * 0.1),
                "b": jnp.zeros(sizes[-1]),
            }
        )

        def loss_fn(params, x, y):
            new_stats = []
            for p in params[:-1]:
                z = x @ p["W"]
                zt, mean, var = self._bn(jnp, z, p["gamma"], p["beta"])
                new_stats.append((mean, var))
                x = g(zt)
            logits = x @ params[-1]["W"] + params[-1]["b"]
            logp = jax.nn.log_softmax(logits)
            return -jnp.take_along_axis(logp, y[:, None], axis=1).mean(), new_stats

        @jax.jit
        def train_step(params, stats, x, y):
            (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, y)
            params = jax.tree_util.tree_map(lambda p, g: p - lr * g, params, grads)
            m = x.shape[0]
            stats = [
                {"mean": 0.9 * s["mean"] + 0.1 * mu, "var": 0.9 * s["var"] + 0.1 * v * m / (m - 1)}
                for s, (mu, v) in zip(stats, batch_stats)
            ]
            return params, stats, loss

        X, y = make_batches(sizes, batch)
        batches = [(jnp.asarray(X[j : j + batch]), jnp.asarray(y[j : j + batch])) for j in range(0, len(X), batch)]
        state = {"i": 0, "params": params, "stats": stats}

        def step():
            xb, yb = batches[state["i"] % len(batches)]
            state["i"] += 1
            state["params"], state["stats"], loss = train_step(state["params"], state["stats"], xb, yb)
            loss.block_until_ready()

        return {"times": timed(step, task["reps"], task.get("min_seconds", 1.0))}


def main():
    impl = {"bnnet": Bnnet, "bnnet-numpy": Bnnet, "torch": Torch, "jax": Jax}[LIB]()
    print(json.dumps({"ready": LIB}), flush=True)
    for line in sys.stdin:
        task = json.loads(line)
        try:
            result = getattr(impl, task["task"])(task)
        except Exception as e:  # report, keep serving
            result = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

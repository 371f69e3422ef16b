# ruff: noqa: UP032  (the example's str.format calls, kept as they are)
import time

STARTED_AT = time.time()  # before the imports: benchmarks/end_to_end.py counts them as start-up

# The classic PyTorch VAE example (github.com/pytorch/examples, vae/main.py), as the script a user runs and the
# harness is compared with (benchmarks/end_to_end.py). Kept as the example has it: torchvision MNIST + ToTensor,
# a shuffled DataLoader, the two-head MLP (fc21/fc22), sigmoid + summed BCE + KL, default Adam at 1e-3, the
# per-step `loss.item()`, the log line every 10 batches, a test pass over the 10,000 test images after every
# epoch, and the reconstruction/sample PNGs of every epoch. Changed: batch 50 and z=2 by default (configs/z2.yaml),
# the data and results folders are arguments, download only where the files are missing, and the last line is
# the timings (TIMINGS {json}) for benchmarks/end_to_end.py.
#
#     python benchmarks/tutorial_script.py --epochs 20 --data-root data --results-dir /tmp/results
import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402

import torch  # noqa: E402
import torch.utils.data  # noqa: E402
from torch import nn, optim  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from torchvision import datasets, transforms  # noqa: E402
from torchvision.utils import save_image  # noqa: E402

IMPORTED_AT = time.time()

parser = argparse.ArgumentParser(description="VAE MNIST Example")
parser.add_argument("--batch-size", type=int, default=50, metavar="N",
                    help="input batch size for training and test (default: 50)")
parser.add_argument("--epochs", type=int, default=20, metavar="N", help="number of epochs to train (default: 20)")
parser.add_argument("--z-dim", type=int, default=2, metavar="N", help="latent dimensions (default: 2)")
parser.add_argument("--no-cuda", action="store_true", default=False, help="disables CUDA training")
parser.add_argument("--seed", type=int, default=1, metavar="S", help="random seed (default: 1)")
parser.add_argument("--log-interval", type=int, default=10, metavar="N",
                    help="how many batches to wait before logging training status")
parser.add_argument("--data-root", default="data", help="torchvision's MNIST root: <root>/MNIST/raw (default: data)")
parser.add_argument("--results-dir", default="results", help="where the example's PNGs go (default: results)")
args = parser.parse_args()
args.cuda = not args.no_cuda and torch.cuda.is_available()

torch.manual_seed(args.seed)

device = torch.device("cuda" if args.cuda else "cpu")
os.makedirs(args.results_dir, exist_ok=True)

kwargs = {"num_workers": 1, "pin_memory": True} if args.cuda else {}
train_loader = torch.utils.data.DataLoader(
    datasets.MNIST(args.data_root, train=True, download=True, transform=transforms.ToTensor()),
    batch_size=args.batch_size, shuffle=True, **kwargs)
test_loader = torch.utils.data.DataLoader(
    datasets.MNIST(args.data_root, train=False, transform=transforms.ToTensor()),
    batch_size=args.batch_size, shuffle=False, **kwargs)


class VAE(nn.Module):
    def __init__(self):
        super().__init__()

        self.fc1 = nn.Linear(784, 400)
        self.fc21 = nn.Linear(400, args.z_dim)
        self.fc22 = nn.Linear(400, args.z_dim)
        self.fc3 = nn.Linear(args.z_dim, 400)
        self.fc4 = nn.Linear(400, 784)

    def encode(self, x):
        h1 = F.relu(self.fc1(x))
        return self.fc21(h1), self.fc22(h1)

    def reparameterize(self, mu, logvar):
        std = torch.exp(0.5 * logvar)
        eps = torch.randn_like(std)
        return mu + eps * std

    def decode(self, z):
        h3 = F.relu(self.fc3(z))
        return torch.sigmoid(self.fc4(h3))

    def forward(self, x):
        mu, logvar = self.encode(x.view(-1, 784))
        z = self.reparameterize(mu, logvar)
        return self.decode(z), mu, logvar


model = VAE().to(device)
optimizer = optim.Adam(model.parameters(), lr=1e-3)

timings = {"started_at": STARTED_AT, "imported_at": IMPORTED_AT, "first_step_at": None, "device": str(device),
           "train_images": len(train_loader.dataset), "test_images": len(test_loader.dataset),
           "epoch_started_at": [], "train_s": [], "test_s": [], "samples_s": [], "train_loss": [], "test_loss": []}


# Reconstruction + KL divergence losses summed over all elements and batch
def loss_function(recon_x, x, mu, logvar):
    BCE = F.binary_cross_entropy(recon_x, x.view(-1, 784), reduction="sum")

    # see Appendix B from VAE paper:
    # Kingma and Welling. Auto-Encoding Variational Bayes. ICLR, 2014
    # https://arxiv.org/abs/1312.6114
    # 0.5 * sum(1 + log(sigma^2) - mu^2 - sigma^2)
    KLD = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())

    return BCE + KLD


def train(epoch):
    model.train()
    train_loss = 0
    for batch_idx, (data, _) in enumerate(train_loader):
        data = data.to(device)
        optimizer.zero_grad()
        recon_batch, mu, logvar = model(data)
        loss = loss_function(recon_batch, data, mu, logvar)
        loss.backward()
        train_loss += loss.item()
        optimizer.step()
        if timings["first_step_at"] is None:
            timings["first_step_at"] = time.time()  # after the first update (its loss.item() synchronised)
        if batch_idx % args.log_interval == 0:
            print("Train Epoch: {} [{}/{} ({:.0f}%)]\tLoss: {:.6f}".format(
                epoch, batch_idx * len(data), len(train_loader.dataset),
                100. * batch_idx / len(train_loader),
                loss.item() / len(data)))

    print("====> Epoch: {} Average loss: {:.4f}".format(
          epoch, train_loss / len(train_loader.dataset)))
    return train_loss / len(train_loader.dataset)


def test(epoch):
    model.eval()
    test_loss = 0
    with torch.no_grad():
        for i, (data, _) in enumerate(test_loader):
            data = data.to(device)
            recon_batch, mu, logvar = model(data)
            test_loss += loss_function(recon_batch, data, mu, logvar).item()
            if i == 0:
                n = min(data.size(0), 8)
                comparison = torch.cat([data[:n],
                                        recon_batch.view(args.batch_size, 1, 28, 28)[:n]])
                save_image(comparison.cpu(),
                           os.path.join(args.results_dir, "reconstruction_" + str(epoch) + ".png"), nrow=n)

    test_loss /= len(test_loader.dataset)
    print("====> Test set loss: {:.4f}".format(test_loss))
    return test_loss


if __name__ == "__main__":
    for epoch in range(1, args.epochs + 1):
        began = time.time()
        timings["epoch_started_at"].append(began)
        timings["train_loss"].append(train(epoch))
        trained = time.time()
        timings["test_loss"].append(test(epoch))
        tested = time.time()
        with torch.no_grad():
            sample = torch.randn(64, args.z_dim).to(device)
            sample = model.decode(sample).cpu()
            save_image(sample.view(64, 1, 28, 28),
                       os.path.join(args.results_dir, "sample_" + str(epoch) + ".png"))
        timings["train_s"].append(trained - began)
        timings["test_s"].append(tested - trained)
        timings["samples_s"].append(time.time() - tested)
    timings["finished_at"] = time.time()
    print("TIMINGS " + json.dumps(timings), flush=True)

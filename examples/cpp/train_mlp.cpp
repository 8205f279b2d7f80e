// Trains a small MLP on a synthetic regression task with
// torchopt_ext::optim::AdamW and a LibTorch StepLR schedule.
#include <torch/torch.h>
#include <torchopt_ext/torchopt_ext.h>

#include <cstdio>
#include <cstdlib>

int main(int argc, char** argv) {
  const int steps = argc > 1 ? std::atoi(argv[1]) : 300;
  torch::manual_seed(0);

  // Target: y = sin(x W) summed over features, a smooth nonlinear function.
  const auto inputs = torch::randn({512, 16});
  const auto mixing = torch::randn({16, 8});
  const auto targets = torch::sin(inputs.matmul(mixing)).sum(1, true);

  torch::nn::Sequential model(torch::nn::Linear(16, 64), torch::nn::Tanh(), torch::nn::Linear(64, 64),
                              torch::nn::Tanh(), torch::nn::Linear(64, 1));
  torchopt_ext::optim::AdamW optimizer(model->parameters(), torchopt_ext::optim::AdamWOptions(3e-3).weight_decay(1e-4));
  torch::optim::StepLR scheduler(optimizer, /*step_size=*/100, /*gamma=*/0.5);

  for (int step = 1; step <= steps; ++step) {
    optimizer.zero_grad();
    auto loss = torch::mse_loss(model->forward(inputs), targets);
    loss.backward();
    optimizer.step();
    scheduler.step();
    if (step == 1 || step % 50 == 0) {
      std::printf("step %4d  loss %.6f  lr %.2e\n", step, loss.item<double>(),
                  optimizer.param_groups()[0].options().get_lr());
    }
  }
  return 0;
}

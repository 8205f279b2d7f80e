#include "torchopt_ext/schedules/wsd.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <numbers>

namespace torchopt_ext::schedules {

WSDShape parse_wsd_shape(const std::string& name, const char* argument) {
  std::string lower(name);
  std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char c) { return std::tolower(c); });
  if (lower == "linear") {
    return WSDShape::Linear;
  }
  if (lower == "cosine") {
    return WSDShape::Cosine;
  }
  if (lower == "power") {
    return WSDShape::Power;
  }
  if (lower == "exponential") {
    return WSDShape::Exponential;
  }
  TORCH_CHECK_VALUE(false, "WSD: invalid ", argument, " '", name,
                    "': expected 'linear', 'cosine', 'power' or 'exponential'");
}

const char* wsd_shape_name(WSDShape shape) {
  switch (shape) {
    case WSDShape::Linear:
      return "linear";
    case WSDShape::Cosine:
      return "cosine";
    case WSDShape::Power:
      return "power";
    case WSDShape::Exponential:
      return "exponential";
  }
  return "?";
}

namespace {

double apply_shape(WSDShape shape, double x, double power, double rate) {
  switch (shape) {
    case WSDShape::Linear:
      return x;
    case WSDShape::Cosine:
      return 0.5 * (1.0 - std::cos(std::numbers::pi * x));
    case WSDShape::Power:
      return std::pow(x, power);
    case WSDShape::Exponential:
      return std::expm1(rate * x) / std::expm1(rate);
  }
  return x;
}

void check_fraction(const char* name, double value) {
  TORCH_CHECK_VALUE(std::isfinite(value) && value >= 0.0 && value <= 1.0, "WSD: invalid ", name,
                    ": must be in [0, 1], got ", value);
}

}  // namespace

void WSDOptions::validate() const {
  TORCH_CHECK_VALUE(total_steps() > 0, "WSD: invalid total_steps: must be > 0, got ", total_steps());
  check_fraction("warmup_fraction", warmup_fraction());
  check_fraction("decay_fraction", decay_fraction());
  if (warmup_steps()) {
    TORCH_CHECK_VALUE(*warmup_steps() >= 0, "WSD: invalid warmup_steps: must be >= 0, got ", *warmup_steps());
  }
  if (decay_steps()) {
    TORCH_CHECK_VALUE(*decay_steps() >= 0, "WSD: invalid decay_steps: must be >= 0, got ", *decay_steps());
  }
  TORCH_CHECK_VALUE(resolved_warmup_steps() + resolved_decay_steps() <= total_steps(),
                    "WSD: invalid warmup_steps + decay_steps: ", resolved_warmup_steps(), " + ", resolved_decay_steps(),
                    " exceeds total_steps ", total_steps());
  check_fraction("final_lr_ratio", final_lr_ratio());
  TORCH_CHECK_VALUE(std::isfinite(warmup_power()) && warmup_power() > 0.0,
                    "WSD: invalid warmup_power: must be > 0, got ", warmup_power());
  TORCH_CHECK_VALUE(std::isfinite(decay_power()) && decay_power() > 0.0, "WSD: invalid decay_power: must be > 0, got ",
                    decay_power());
  TORCH_CHECK_VALUE(std::isfinite(exponential_rate()) && exponential_rate() != 0.0,
                    "WSD: invalid exponential_rate: must be finite and nonzero, got ", exponential_rate());
}

int64_t WSDOptions::resolved_warmup_steps() const {
  return warmup_steps() ? *warmup_steps()
                        : static_cast<int64_t>(static_cast<double>(total_steps()) * warmup_fraction());
}

int64_t WSDOptions::resolved_decay_steps() const {
  return decay_steps() ? *decay_steps() : static_cast<int64_t>(static_cast<double>(total_steps()) * decay_fraction());
}

double wsd_lr_factor(int64_t step, const WSDOptions& options) {
  TORCH_CHECK_VALUE(step >= 0, "wsd_lr_factor: invalid step: must be >= 0, got ", step);
  const int64_t warmup = options.resolved_warmup_steps();
  const int64_t decay_start = options.total_steps() - options.resolved_decay_steps();
  const int64_t last = options.total_steps() - 1;
  double factor = 1.0;
  if (step <= warmup) {
    const double x = static_cast<double>(step + 1) / static_cast<double>(warmup + 1);
    factor = apply_shape(options.warmup_shape(), x, options.warmup_power(), options.exponential_rate());
  } else if (step > decay_start) {
    const double span = static_cast<double>(std::max<int64_t>(last - decay_start, 1));
    const double x = std::min(static_cast<double>(step - decay_start) / span, 1.0);
    const double r = options.final_lr_ratio();
    factor = r + (1.0 - r) *
                     (1.0 - apply_shape(options.decay_shape(), x, options.decay_power(), options.exponential_rate()));
  }
  return std::max(factor, 0.0);
}

WSD::WSD(torch::optim::Optimizer& optimizer, WSDOptions options)
    : torch::optim::LRScheduler(optimizer), options_(std::move(options)) {
  options_.validate();
  peak_lrs_ = get_current_lrs();
  const double factor = wsd_lr_factor(0, options_);
  for (size_t i = 0; i < optimizer.param_groups().size(); ++i) {
    optimizer.param_groups()[i].options().set_lr(peak_lrs_[i] * factor);
  }
}

std::vector<double> WSD::get_lrs() {
  // LRScheduler::step() applies these, then advances step_count_.
  const double factor = wsd_lr_factor(static_cast<int64_t>(step_count_) + 1, options_);
  std::vector<double> lrs(peak_lrs_.size());
  for (size_t i = 0; i < lrs.size(); ++i) {
    lrs[i] = peak_lrs_[i] * factor;
  }
  return lrs;
}

}  // namespace torchopt_ext::schedules

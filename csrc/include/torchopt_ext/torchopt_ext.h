// Umbrella header for LibTorch programs: #include <torchopt_ext/torchopt_ext.h>
#pragma once

#include "torchopt_ext/functional/adam.h"
#include "torchopt_ext/functional/lion.h"
#include "torchopt_ext/functional/mars.h"
#include "torchopt_ext/functional/nadam.h"
#include "torchopt_ext/functional/qhadam.h"
#include "torchopt_ext/functional/radam.h"
#include "torchopt_ext/functional/sgd.h"
#include "torchopt_ext/optim/adam.h"
#include "torchopt_ext/optim/adamw.h"
#include "torchopt_ext/optim/lion.h"
#include "torchopt_ext/optim/mars.h"
#include "torchopt_ext/optim/nadamw.h"
#include "torchopt_ext/optim/qhadamw.h"
#include "torchopt_ext/optim/radam.h"
#include "torchopt_ext/optim/sgd.h"

// torchopt_ext._C: an empty Python module (limited API) whose only job is to
// load libtorchopt_ext, whose static initialisers register the ops. Keeping
// the ops in the shared library means LibTorch programs and Python load the
// very same registrations, exactly once.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "torchopt_ext native library loader", -1, nullptr};
  return PyModule_Create(&module);
}

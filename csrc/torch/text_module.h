// Python bindings of the torch-free text tools (csrc/text/), added to the module _C.
#pragma once

#include <pybind11/pybind11.h>

namespace exaone_ext {

void register_text_bindings(pybind11::module_& m);

}  // namespace exaone_ext

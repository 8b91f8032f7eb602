// pybind11 layer over csrc/text/decontaminate.h: Python strings (or UTF-8 bytes) in, hits out; the
// GIL is released while the documents are checked.
#include "torch/text_module.h"

#include <pybind11/stl.h>

#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>

#include "text/decontaminate.h"

namespace py = pybind11;

namespace exaone_ext {

namespace {

using text::Normalizer;
using text::Pool;

// UTF-8 views of a list of str / bytes; the list keeps the objects (and str's cached UTF-8) alive.
std::vector<std::string_view> utf8_views(const py::list& items, const char* where) {
  std::vector<std::string_view> out;
  out.reserve(items.size());
  size_t i = 0;
  for (py::handle h : items) {
    PyObject* o = h.ptr();
    if (PyUnicode_Check(o)) {
      Py_ssize_t n = 0;
      const char* p = PyUnicode_AsUTF8AndSize(o, &n);
      if (p == nullptr) {
        PyErr_Clear();
        throw py::value_error(std::string(where) + "[" + std::to_string(i) +
                              "]: not encodable as UTF-8 (lone surrogate code points)");
      }
      out.emplace_back(p, size_t(n));
    } else if (PyBytes_Check(o)) {
      out.emplace_back(PyBytes_AS_STRING(o), size_t(PyBytes_GET_SIZE(o)));
    } else {
      throw py::type_error(std::string(where) + "[" + std::to_string(i) + "]: expected str or bytes, got " +
                           std::string(py::str(py::type::of(h).attr("__name__"))));
    }
    ++i;
  }
  return out;
}

py::str to_str(const std::vector<uint32_t>& cps) {
  std::string s;
  s.reserve(cps.size());
  for (uint32_t c : cps) {
    if (c < 0x80) {
      s += char(c);
    } else if (c < 0x800) {
      s += char(0xC0 | (c >> 6));
      s += char(0x80 | (c & 0x3F));
    } else if (c < 0x10000) {
      s += char(0xE0 | (c >> 12));
      s += char(0x80 | ((c >> 6) & 0x3F));
      s += char(0x80 | (c & 0x3F));
    } else {
      s += char(0xF0 | (c >> 18));
      s += char(0x80 | ((c >> 12) & 0x3F));
      s += char(0x80 | ((c >> 6) & 0x3F));
      s += char(0x80 | (c & 0x3F));
    }
  }
  PyObject* o = PyUnicode_DecodeUTF8(s.data(), Py_ssize_t(s.size()), "strict");
  if (o == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::str>(o);
}

}  // namespace

void register_text_bindings(py::module_& m) {
  py::class_<Normalizer, std::shared_ptr<Normalizer>>(m, "_TextNormalizer",
      "Unicode normalisation for decontamination from a table built in Python (see exaone_ext.data.decontaminate).")
      .def(py::init([](py::bytes table, std::vector<uint32_t> extra, bool vectorize) {
             const std::string_view raw = table;
             if (raw.size() != size_t(text::kTableSize) * 4)
               throw py::value_error("_TextNormalizer: table must be 0x110000 little-endian uint32 (4456448 bytes), got " +
                                     std::to_string(raw.size()) + " bytes");
             std::vector<uint32_t> t(text::kTableSize);
             std::memcpy(t.data(), raw.data(), raw.size());
             return std::make_shared<Normalizer>(std::move(t), std::move(extra), vectorize);
           }),
           py::arg("table"), py::arg("extra"), py::arg("vectorize") = true)
      .def_property_readonly("vectorized", &Normalizer::vectorized,
           "Whether runs of ASCII take the AVX2 path (AVX2 CPU and the standard ASCII rule).")
      .def("normalize", [](const Normalizer& n, py::object s) {
             py::list one;
             one.append(s);
             auto views = utf8_views(one, "text");
             std::vector<uint32_t> cps;
             if (!n.normalize(views[0], cps)) throw py::value_error("normalize: text is not valid UTF-8");
             return to_str(cps);
           }, py::arg("text"), "The normalised text (str or UTF-8 bytes in, str out).");

  py::class_<Pool>(m, "_DecontaminationPool", "Hashed windows of normalised test examples.")
      .def(py::init([](std::shared_ptr<Normalizer> norm, int64_t window, py::list tests, std::vector<int32_t> groups) {
             auto views = utf8_views(tests, "tests");
             py::gil_scoped_release release;
             return std::make_unique<Pool>(*norm, window, views, groups);
           }),
           py::arg("normalizer"), py::arg("window"), py::arg("tests"), py::arg("groups"), py::keep_alive<1, 2>())
      .def("check", [](const Pool& pool, py::list docs, const std::string& mode, int64_t samples, int threads) {
             if (mode != "sampled" && mode != "exhaustive")
               throw py::value_error("check: mode must be 'sampled' or 'exhaustive', got '" + mode + "'");
             if (threads < 1) throw py::value_error("check: threads must be >= 1, got " + std::to_string(threads));
             auto views = utf8_views(docs, "docs");
             std::vector<text::Hit> hits;
             std::vector<int64_t> invalid;
             {
               py::gil_scoped_release release;
               pool.check(views, mode == "sampled" ? text::Mode::kSampled : text::Mode::kExhaustive, samples, threads,
                          hits, invalid);
             }
             py::list out;
             for (const auto& h : hits) out.append(py::make_tuple(h.doc, h.test, h.offset));
             return py::make_tuple(out, py::cast(invalid));
           },
           py::arg("docs"), py::arg("mode"), py::arg("samples"), py::arg("threads"),
           "Checks documents; returns ([(doc, test, offset) one per matched benchmark], [invalid UTF-8 docs]).")
      .def_property_readonly("window", &Pool::window)
      .def_property_readonly("num_windows", &Pool::num_windows)
      .def_property_readonly("num_short", &Pool::num_short)
      .def_property_readonly("num_tests", &Pool::num_tests)
      .def_property_readonly("table_bytes", &Pool::table_bytes);
}

}  // namespace exaone_ext

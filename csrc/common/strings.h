// Message building without iostreams. Number formatting through std::ostream needs the C++ locale
// machinery of whichever libstdc++ the library was linked with; seen crashing (SIGSEGV in
// codecvt::do_unshift) on a toolchain that mixes two of them, so error paths use std::to_string only.
#pragma once

#include <string>
#include <type_traits>

namespace flash_attn2 {

namespace detail {
inline void append(std::string& s, std::string const& x) { s += x; }
inline void append(std::string& s, char const* x) { s += x; }
template <class T, class = std::enable_if_t<std::is_arithmetic_v<T>>>
void append(std::string& s, T x) {
  s += std::to_string(x);
}
}  // namespace detail

template <class... Args>
std::string str_cat(Args const&... args) {
  std::string s;
  (detail::append(s, args), ...);
  return s;
}

}  // namespace flash_attn2

#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace safron {

// Builds an error message from streamable parts, e.g. concat("patch=", patch, " must be >= 1").
template <class... Parts>
std::string concat(const Parts&... parts) {
  std::ostringstream message;
  (message << ... << parts);
  return message.str();
}

// Throws std::invalid_argument (ValueError in Python) when a caller-supplied argument is wrong.
// The message should name the offending value so the user can act on it.
template <class... Parts>
void require(bool condition, const Parts&... parts) {
  if (!condition) throw std::invalid_argument(concat(parts...));
}

}  // namespace safron

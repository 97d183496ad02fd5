// pos_client: a point-of-sale client of the UniMP Edge gRPC API.
//
//   pos_client recommend --target HOST:PORT [--user U] [--item ID ...] [--top-k N]
//                        [--mode fast|beam|beam-constrained] [--token T]
//                        [--ca FILE [--cert FILE --key FILE] [--server-name NAME]] [--timeout-ms MS]
//   pos_client delete-interaction --target HOST:PORT --user U --interaction-id N [--token T] [TLS options]
//   pos_client forget-user --target HOST:PORT --user U [--token T] [TLS options]
//   pos_client generate-image --target HOST:PORT --query TEXT --out FILE.png [--user U] [--item ID ...]
//                        [--image-model auto|vqgan|diffusion] [--steps N] [--seed N] [--token T] [TLS options]
//   pos_client health    --target HOST:PORT [--service NAME] [TLS options]
//
// recommend prints one line per item: rank, item id, score, title (tab-separated); delete-interaction
// prints the interactions still stored; forget-user prints the interactions and cached prefixes removed;
// generate-image prints each progress message to stderr, writes the PNG to --out and prints its path,
// size and the personalised prompt.
// Exit status: 0 success, 1 RPC error (status code and message on stderr), 2 bad usage.
#include <grpcpp/grpcpp.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "grpc/health/v1/health.grpc.pb.h"
#include "unimp/v1/personalization.grpc.pb.h"

namespace {

constexpr int kOk = 0;
constexpr int kRpcError = 1;
constexpr int kUsage = 2;

struct Options {
  std::string command;
  std::string target = "127.0.0.1:50051";
  std::string token;
  std::string user;
  std::vector<std::string> items;
  int top_k = 10;
  unimp::v1::DecodeMode mode = unimp::v1::DECODE_MODE_FAST;
  long long interaction_id = 0;
  std::string query, out;
  unimp::v1::ImageModel image_model = unimp::v1::IMAGE_MODEL_UNSPECIFIED;
  int steps = 0;
  long long seed = 0;
  std::string ca, cert, key, server_name;
  std::string service;
  long timeout_ms = 5000;
};

const char* kUsageText =
    "usage: pos_client recommend --target HOST:PORT [--user U] [--item ID ...] [--top-k N]\n"
    "                            [--mode fast|beam|beam-constrained] [--token T]\n"
    "                            [--ca FILE [--cert FILE --key FILE] [--server-name NAME]] [--timeout-ms MS]\n"
    "       pos_client delete-interaction --target HOST:PORT --user U --interaction-id N [--token T] [TLS options]\n"
    "       pos_client forget-user --target HOST:PORT --user U [--token T] [TLS options]\n"
    "       pos_client generate-image --target HOST:PORT --query TEXT --out FILE.png [--user U] [--item ID ...]\n"
    "                            [--image-model auto|vqgan|diffusion] [--steps N] [--seed N] [--token T] [TLS options]\n"
    "       pos_client health --target HOST:PORT [--service NAME] [--token T] [TLS options]\n";

const char* StatusName(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::OK: return "OK";
    case grpc::StatusCode::CANCELLED: return "CANCELLED";
    case grpc::StatusCode::UNKNOWN: return "UNKNOWN";
    case grpc::StatusCode::INVALID_ARGUMENT: return "INVALID_ARGUMENT";
    case grpc::StatusCode::DEADLINE_EXCEEDED: return "DEADLINE_EXCEEDED";
    case grpc::StatusCode::NOT_FOUND: return "NOT_FOUND";
    case grpc::StatusCode::ALREADY_EXISTS: return "ALREADY_EXISTS";
    case grpc::StatusCode::PERMISSION_DENIED: return "PERMISSION_DENIED";
    case grpc::StatusCode::RESOURCE_EXHAUSTED: return "RESOURCE_EXHAUSTED";
    case grpc::StatusCode::FAILED_PRECONDITION: return "FAILED_PRECONDITION";
    case grpc::StatusCode::ABORTED: return "ABORTED";
    case grpc::StatusCode::OUT_OF_RANGE: return "OUT_OF_RANGE";
    case grpc::StatusCode::UNIMPLEMENTED: return "UNIMPLEMENTED";
    case grpc::StatusCode::INTERNAL: return "INTERNAL";
    case grpc::StatusCode::UNAVAILABLE: return "UNAVAILABLE";
    case grpc::StatusCode::DATA_LOSS: return "DATA_LOSS";
    case grpc::StatusCode::UNAUTHENTICATED: return "UNAUTHENTICATED";
    default: return "UNRECOGNIZED";
  }
}

bool ReadFile(const std::string& path, std::string* out) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return false;
  std::ostringstream buffer;
  buffer << in.rdbuf();
  *out = buffer.str();
  return true;
}

// Parses argv into opts; returns false (after printing why) on bad usage.
bool Parse(int argc, char** argv, Options* opts) {
  if (argc < 2) {
    std::cerr << kUsageText;
    return false;
  }
  opts->command = argv[1];
  if (opts->command == "--help" || opts->command == "-h") {
    std::cout << kUsageText;
    std::exit(kOk);
  }
  if (opts->command != "recommend" && opts->command != "health" && opts->command != "forget-user" &&
      opts->command != "delete-interaction" && opts->command != "generate-image") {
    std::cerr << "unknown command '" << opts->command << "'\n" << kUsageText;
    return false;
  }
  for (int i = 2; i < argc; ++i) {
    const std::string flag = argv[i];
    auto value = [&](std::string* dest) {
      if (i + 1 >= argc) {
        std::cerr << flag << " needs a value\n";
        return false;
      }
      *dest = argv[++i];
      return true;
    };
    std::string number;
    if (flag == "--target") {
      if (!value(&opts->target)) return false;
    } else if (flag == "--token") {
      if (!value(&opts->token)) return false;
    } else if (flag == "--user") {
      if (!value(&opts->user)) return false;
    } else if (flag == "--item") {
      // --item A [B C ...] and repeated --item flags both work.
      if (i + 1 >= argc || std::string(argv[i + 1]).rfind("--", 0) == 0) {
        std::cerr << "--item needs at least one catalog id\n";
        return false;
      }
      while (i + 1 < argc && std::string(argv[i + 1]).rfind("--", 0) != 0) opts->items.emplace_back(argv[++i]);
    } else if (flag == "--top-k") {
      if (!value(&number)) return false;
      opts->top_k = std::atoi(number.c_str());
    } else if (flag == "--mode") {
      if (!value(&number)) return false;
      if (number == "fast") {
        opts->mode = unimp::v1::DECODE_MODE_FAST;
      } else if (number == "beam") {
        opts->mode = unimp::v1::DECODE_MODE_BEAM;
      } else if (number == "beam-constrained") {
        opts->mode = unimp::v1::DECODE_MODE_BEAM_CONSTRAINED;
      } else {
        std::cerr << "--mode must be fast, beam or beam-constrained, got '" << number << "'\n";
        return false;
      }
    } else if (flag == "--query") {
      if (!value(&opts->query)) return false;
    } else if (flag == "--out") {
      if (!value(&opts->out)) return false;
    } else if (flag == "--steps") {
      if (!value(&number)) return false;
      opts->steps = std::atoi(number.c_str());
    } else if (flag == "--seed") {
      if (!value(&number)) return false;
      opts->seed = std::atoll(number.c_str());
    } else if (flag == "--image-model") {
      if (!value(&number)) return false;
      if (number == "auto") {
        opts->image_model = unimp::v1::IMAGE_MODEL_UNSPECIFIED;
      } else if (number == "vqgan") {
        opts->image_model = unimp::v1::IMAGE_MODEL_VQGAN;
      } else if (number == "diffusion") {
        opts->image_model = unimp::v1::IMAGE_MODEL_DIFFUSION;
      } else {
        std::cerr << "--image-model must be auto, vqgan or diffusion, got '" << number << "'\n";
        return false;
      }
    } else if (flag == "--interaction-id") {
      if (!value(&number)) return false;
      opts->interaction_id = std::atoll(number.c_str());
    } else if (flag == "--timeout-ms") {
      if (!value(&number)) return false;
      opts->timeout_ms = std::atol(number.c_str());
    } else if (flag == "--ca") {
      if (!value(&opts->ca)) return false;
    } else if (flag == "--cert") {
      if (!value(&opts->cert)) return false;
    } else if (flag == "--key") {
      if (!value(&opts->key)) return false;
    } else if (flag == "--server-name") {
      if (!value(&opts->server_name)) return false;
    } else if (flag == "--service") {
      if (!value(&opts->service)) return false;
    } else {
      std::cerr << "unknown option '" << flag << "'\n" << kUsageText;
      return false;
    }
  }
  if (opts->timeout_ms <= 0) {
    std::cerr << "--timeout-ms must be positive\n";
    return false;
  }
  if ((opts->command == "forget-user" || opts->command == "delete-interaction") && opts->user.empty()) {
    std::cerr << opts->command << " needs --user\n";
    return false;
  }
  if (opts->command == "generate-image" && (opts->query.empty() || opts->out.empty())) {
    std::cerr << "generate-image needs --query TEXT and --out FILE.png\n";
    return false;
  }
  if (opts->command == "delete-interaction" && opts->interaction_id <= 0) {
    std::cerr << "delete-interaction needs --interaction-id N (N > 0, as RecordInteraction returned)\n";
    return false;
  }
  return true;
}

// Plaintext, or TLS when --ca is given (mutual TLS with --cert/--key).
std::shared_ptr<grpc::Channel> MakeChannel(const Options& opts, bool* ok) {
  *ok = true;
  grpc::ChannelArguments args;
  if (opts.ca.empty()) {
    return grpc::CreateCustomChannel(opts.target, grpc::InsecureChannelCredentials(), args);
  }
  grpc::SslCredentialsOptions ssl;
  if (!ReadFile(opts.ca, &ssl.pem_root_certs)) {
    std::cerr << "cannot read --ca " << opts.ca << "\n";
    *ok = false;
    return nullptr;
  }
  if (!opts.cert.empty() || !opts.key.empty()) {
    if (!ReadFile(opts.cert, &ssl.pem_cert_chain) || !ReadFile(opts.key, &ssl.pem_private_key)) {
      std::cerr << "mutual TLS needs readable --cert and --key files\n";
      *ok = false;
      return nullptr;
    }
  }
  if (!opts.server_name.empty()) args.SetSslTargetNameOverride(opts.server_name);
  return grpc::CreateCustomChannel(opts.target, grpc::SslCredentials(ssl), args);
}

void Prepare(const Options& opts, grpc::ClientContext* context) {
  context->set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(opts.timeout_ms));
  if (!opts.token.empty()) context->AddMetadata("authorization", "Bearer " + opts.token);
}

int Report(const grpc::Status& status, const grpc::ClientContext& context) {
  std::cerr << "error: " << StatusName(status.error_code()) << ": " << status.error_message();
  const auto& trailers = context.GetServerTrailingMetadata();
  auto field = trailers.find("unimp-field");
  if (field != trailers.end()) std::cerr << " (field " << std::string(field->second.data(), field->second.size()) << ")";
  std::cerr << "\n";
  return kRpcError;
}

int Recommend(const Options& opts, const std::shared_ptr<grpc::Channel>& channel) {
  auto stub = unimp::v1::Personalization::NewStub(channel);
  unimp::v1::RecommendRequest request;
  request.set_user_id(opts.user);
  for (const auto& id : opts.items) request.add_history()->set_item_id(id);
  request.mutable_options()->set_top_k(opts.top_k);
  request.mutable_options()->set_mode(opts.mode);

  unimp::v1::RecommendResponse response;
  grpc::ClientContext context;
  Prepare(opts, &context);
  grpc::Status status = stub->Recommend(&context, request, &response);
  if (!status.ok()) return Report(status, context);
  int rank = 0;
  for (const auto& item : response.items()) {
    std::cout << ++rank << '\t' << item.item_id() << '\t' << item.score() << '\t' << item.attributes().title() << '\n';
  }
  return kOk;
}

int DeleteInteraction(const Options& opts, const std::shared_ptr<grpc::Channel>& channel) {
  auto stub = unimp::v1::Personalization::NewStub(channel);
  unimp::v1::DeleteInteractionRequest request;
  request.set_user_id(opts.user);
  request.set_interaction_id(opts.interaction_id);
  unimp::v1::DeleteInteractionResponse response;
  grpc::ClientContext context;
  Prepare(opts, &context);
  grpc::Status status = stub->DeleteInteraction(&context, request, &response);
  if (!status.ok()) return Report(status, context);
  std::cout << "history_length\t" << response.history_length() << '\n';
  return kOk;
}

int ForgetUser(const Options& opts, const std::shared_ptr<grpc::Channel>& channel) {
  auto stub = unimp::v1::Personalization::NewStub(channel);
  unimp::v1::ForgetUserRequest request;
  request.set_user_id(opts.user);
  unimp::v1::ForgetUserResponse response;
  grpc::ClientContext context;
  Prepare(opts, &context);
  grpc::Status status = stub->ForgetUser(&context, request, &response);
  if (!status.ok()) return Report(status, context);
  std::cout << "interactions_removed\t" << response.interactions_removed() << '\n'
            << "prefixes_removed\t" << response.prefixes_removed() << '\n';
  return kOk;
}

int GenerateImage(const Options& opts, const std::shared_ptr<grpc::Channel>& channel) {
  auto stub = unimp::v1::Personalization::NewStub(channel);
  unimp::v1::GenerateImageRequest request;
  request.set_user_id(opts.user);
  for (const auto& id : opts.items) request.add_history()->set_item_id(id);
  request.set_query(opts.query);
  request.set_steps(opts.steps);
  request.set_seed(static_cast<uint32_t>(opts.seed));
  request.set_image_model(opts.image_model);
  grpc::ClientContext context;
  Prepare(opts, &context);
  std::unique_ptr<grpc::ClientReader<unimp::v1::GenerateImageResponse>> reader(stub->GenerateImage(&context, request));
  unimp::v1::GenerateImageResponse message;
  bool written = false;
  while (reader->Read(&message)) {
    if (message.has_progress()) {
      std::cerr << "progress " << message.progress().step() << '/' << message.progress().total_steps() << '\n';
    } else if (message.has_image()) {
      const auto& image = message.image();
      std::ofstream file(opts.out, std::ios::binary);
      file.write(image.png().data(), static_cast<std::streamsize>(image.png().size()));
      if (!file) {
        std::cerr << "cannot write --out " << opts.out << "\n";
        context.TryCancel();
        reader->Finish();
        return kRpcError;
      }
      written = true;
      std::cout << "png\t" << opts.out << '\t' << image.width() << 'x' << image.height() << '\n'
                << "prompt\t" << image.prompt() << '\n';
    }
  }
  grpc::Status status = reader->Finish();
  if (!status.ok()) return Report(status, context);
  if (!written) {
    std::cerr << "error: the stream ended without an image\n";
    return kRpcError;
  }
  return kOk;
}

int Health(const Options& opts, const std::shared_ptr<grpc::Channel>& channel) {
  auto stub = grpc::health::v1::Health::NewStub(channel);
  grpc::health::v1::HealthCheckRequest request;
  request.set_service(opts.service);
  grpc::health::v1::HealthCheckResponse response;
  grpc::ClientContext context;
  Prepare(opts, &context);
  grpc::Status status = stub->Check(&context, request, &response);
  if (!status.ok()) return Report(status, context);
  std::cout << grpc::health::v1::HealthCheckResponse::ServingStatus_Name(response.status()) << '\n';
  return response.status() == grpc::health::v1::HealthCheckResponse::SERVING ? kOk : kRpcError;
}

}  // namespace

int main(int argc, char** argv) {
  Options opts;
  if (!Parse(argc, argv, &opts)) return kUsage;
  bool ok = false;
  auto channel = MakeChannel(opts, &ok);
  if (!ok) return kUsage;
  if (opts.command == "health") return Health(opts, channel);
  if (opts.command == "forget-user") return ForgetUser(opts, channel);
  if (opts.command == "delete-interaction") return DeleteInteraction(opts, channel);
  if (opts.command == "generate-image") return GenerateImage(opts, channel);
  return Recommend(opts, channel);
}

defmodule SseGateway.TokenTest do
  use ExUnit.Case, async: true

  alias SseGateway.Token
  alias SseGateway.TestSupport.{Gateway, Helpers}

  @secret "a-test-secret-of-reasonable-length-0123456789"

  test "sign/2 makes an HS256 JWT that verify/2 accepts, with exp from ttl" do
    token = Token.sign(%{subscribe: ["projects:*"], sub: "user-1"}, secret: @secret, ttl: 60)
    [h, _, _] = String.split(token, ".")
    assert Base.url_decode64!(h, padding: false) == ~s({"alg":"HS256","typ":"JWT"})

    assert {:ok, %{"subscribe" => ["projects:*"], "sub" => "user-1", "exp" => exp}} =
             Token.verify(token, @secret)

    assert_in_delta exp, System.system_time(:second) + 60, 2
    assert Token.verify(token, "another secret") == {:error, :invalid}
    assert Token.verify(Token.sign(%{exp: 1}, @secret), @secret) == {:error, :expired}
  end

  describe "against a gateway with [auth]" do
    setup do
      gw =
        start_supervised!(
          {Gateway, config: "[auth]\nhs256_secret = \"#{@secret}\"\npublic_topics = []\n"}
        )

      %{url: Gateway.url(gw)}
    end

    test "a signed token publishes and subscribes where its patterns allow, and no further", %{
      url: url
    } do
      publisher = Token.sign(%{publish: ["projects:*"]}, @secret)
      reader = Token.sign(%{subscribe: ["projects:project:*"]}, secret: @secret, ttl: 30)

      assert :ok = SseGateway.subscribe("projects:project:a", url: url, token: reader)

      assert {:ok, _} =
               SseGateway.publish("projects:project:a", :hello, %{"x" => 1},
                 url: url,
                 token: publisher
               )

      assert_receive {:sse_gateway, :event, %SseGateway.Event{event: "hello", data: %{"x" => 1}}},
                     2_000

      assert {:error, %SseGateway.Error{status: 403, code: "forbidden"}} =
               SseGateway.publish("other:topic", :hello, %{}, url: url, token: publisher)

      assert {:error, %SseGateway.Error{status: 401, code: "unauthorized"}} =
               SseGateway.publish("projects:all", :hello, %{},
                 url: url,
                 token: Token.sign(%{publish: ["*"]}, "wrong")
               )

      assert {:error, %SseGateway.Error{status: 401}} =
               SseGateway.publish("projects:all", :hello, %{},
                 url: url,
                 token: Token.sign(%{publish: ["*"], exp: 1}, @secret)
               )

      assert {:error, %SseGateway.Error{status: 403, code: "forbidden"}} =
               SseGateway.subscribe("projects:all", url: url, token: reader)

      assert Helpers.counts(url) == %{}
    end
  end
end
